#!/usr/bin/env python3
"""Install yolov9-qat's QAT tools into an upstream YOLOv9 clone.

    python patches/install.py /path/to/yolov9              # install (or update); a rerun changes nothing
    python patches/install.py /path/to/yolov9 --dry-run    # show what would change, change nothing
    python patches/install.py /path/to/yolov9 --uninstall  # restore the original files, remove ours

Copies INSTALL_ITEMS and INSTALL_DATA (as they are in this checkout now) into the clone, plus any of
our own helper modules they import that the clone lacks and requirements-qat.txt (our packages),
and hooks `--qat` into the clone's train.py with two small
insertions located by anchor text (HOOKS), never by line number. Every import of the installed
files from the clone's `models`/`utils`/... is checked against the clone's own sources first: a
name the clone does not define would crash at run time, so it stops the install instead.
A record (MANIFEST) and a backup of train.py (BACKUP_SUFFIX) make `--uninstall` exact; the record is
written before anything else, so an install cut short is completed by a rerun or undone by --uninstall.
Last, the clone's Python (--python) is checked for known breakages of upstream's own code (qat/upstream_env.py).

Standard library only, so any Python 3.8+ can run it, with or without this project's environment.
"""
import argparse
import ast
import difflib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parents[1]  # this yolov9-qat checkout
INSTALL_ITEMS = ["qat", "train_qat.py", "export_qat.py", "val_trt.py"]  # copied whole (qat/ with subpackages)
# What the installed tools read by default (qat/options.py DEFAULT_HYP / DEFAULT_DATA / DEFAULT_WEIGHTS).
INSTALL_DATA = ["data/hyps/hyp.qat.yaml", "data/demo.yaml", "weights/demo-gelan.pt"]
# Our extra packages, pinned as in our requirements.txt, written into the clone for its environment.
REQUIREMENTS, CLONE_REQUIREMENTS = "requirements.txt", "requirements-qat.txt"
ENV_CHECK = "qat/upstream_env.py"  # run with the clone's Python: known breakages of upstream itself
MANIFEST = ".yolov9-qat-install.json"
BACKUP_SUFFIX = ".orig-yolov9qat"
MARK = "# yolov9-qat"
HOOK_MODULE, HOOK_FUNC = "qat.pipeline", "run_from_train"
SKIP_NAMES = {"__pycache__", ".pytest_cache", ".mypy_cache", ".ipynb_checkpoints"}
SKIP_SUFFIXES = (".pyc", ".pyo")
# What makes a folder an upstream YOLOv9 checkout.
UPSTREAM_FILES = ("train.py", "val.py", "models/yolo.py", "models/common.py", "models/experimental.py",
                  "utils/general.py", "utils/torch_utils.py", "utils/dataloaders.py")
UPSTREAM_MARKER = ("models/common.py", "class RepNCSPELAN4")  # YOLOv9's block; YOLOv5/v7 lack it
# Names that exist upstream with another signature or meaning: importing them is a bug in the tools.
INCOMPATIBLE = {
    "export.export_onnx": "upstream's takes (model, im, file, opset, dynamic, simplify) and swallows errors",
    "models.experimental.attempt_load": "upstream's has no trusted= and no safe loading; use qat.compat.attempt_load",
}


class InstallError(Exception):
    """A refusal: printed as one `error: ...` line, exit status 2, nothing changed."""


# --------------------------------------------------------------------------------------------------
# train.py hooks. `anchor`: regex matched at the start of a statement (`show`: the same for a
# reader); `function`: where that statement must be; `where`: insert before or after it; `lines`:
# what to insert (indented like the anchor, plus 4-space steps). Every inserted line carries MARK.

HOOKS = {
    "train.py": [
        dict(name="--qat option", show="parser.add_argument('--resume'", function="parse_opt", where="after",
             anchor=r"parser\.add_argument\(\s*['\"]--resume['\"]",
             lines=["parser.add_argument('--qat', action='store_true', "
                    f"help='quantization-aware fine-tuning, see train_qat.py')  {MARK}"]),
        dict(name="QAT hand-off", show="amp = check_amp(model)", function="train", where="before",
             anchor=r"amp\s*=\s*check_amp\(\s*model\s*\)",
             lines=[f"if getattr(opt, 'qat', False):  {MARK}: QAT-fine-tune the model built/loaded above",
                    f"    from {HOOK_MODULE} import {HOOK_FUNC}  {MARK}",
                    f"    return {HOOK_FUNC}(model, opt=opt, hyp=hyp, data_dict=data_dict, device=device)  {MARK}"]),
    ],
}


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def split_lines(text):
    """Lines with their endings kept ('\\n' or '\\r\\n'); joining them gives `text` back exactly."""
    return re.findall(r"[^\n]*\n|[^\n]+$", text)


def write_atomic(path, data, mode_from=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode_from is not None:
            shutil.copymode(mode_from, tmp)
        else:
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def rel(path, root):
    return Path(path).relative_to(root).as_posix()


# --------------------------------------------------------------------------------------------------
# Patching train.py


def _enclosing(tree, lineno):
    """(function name, statement node) of the statement that starts on `lineno`."""
    found = [None, None]

    def visit(node, func):
        for child in ast.iter_child_nodes(node):
            f = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
            if isinstance(child, ast.stmt) and child.lineno == lineno and found[1] is None:
                found[:] = [func, child]
            visit(child, f)

    visit(tree, None)
    return found


def hook_blocks(text, fname):
    """[(line index to insert at, block text)] for every hook of `fname`, or InstallError."""
    lines = split_lines(text)
    newline = "\r\n" if lines and lines[0].endswith("\r\n") else "\n"
    try:
        tree = ast.parse(text)
    except SyntaxError as e:
        raise InstallError(f"{fname} does not parse as Python (line {e.lineno}); nothing was changed")
    out = []
    for hook in HOOKS[fname]:
        rx = re.compile(r"^([ \t]*)" + hook["anchor"])
        hits = [i for i, line in enumerate(lines) if rx.match(line)]
        if len(hits) != 1:
            what = "not found" if not hits else f"found {len(hits)} times"
            raise InstallError(f"{fname}: anchor `{hook['show']}` for the {hook['name']} {what}; this {fname} "
                               f"differs from upstream YOLOv9's, so nothing was changed (add the hook by hand, "
                               f"see patches/README.md)")
        func, stmt = _enclosing(tree, hits[0] + 1)
        if stmt is None or func != hook["function"]:
            raise InstallError(f"{fname}: the anchor for the {hook['name']} is not a statement in {hook['function']}() "
                               f"(line {hits[0] + 1}); nothing was changed")
        indent = rx.match(lines[hits[0]]).group(1)
        step = "\t" if indent.startswith("\t") else "    "
        block = ""
        for line in hook["lines"]:
            body = line.lstrip(" ")
            block += indent + step * ((len(line) - len(body)) // 4) + body + newline
        at = hits[0] if hook["where"] == "before" else stmt.end_lineno
        out.append((at, block))
    return out


def apply_blocks(text, blocks):
    lines = split_lines(text)
    if lines and not lines[-1].endswith("\n") and any(at >= len(lines) for at, _ in blocks):
        lines[-1] += "\r\n" if lines[0].endswith("\r\n") else "\n"
    for at, block in sorted(blocks, key=lambda b: -b[0]):
        lines.insert(at, block)
    return "".join(lines)


def remove_blocks(text, blocks):
    """`text` without each of `blocks` (each must be there exactly once), else None."""
    for block in blocks:
        if text.count(block) != 1:
            return None
        text = text.replace(block, "", 1)
    return text


def patched_text(base, fname):
    if re.search(r"['\"]--qat['\"]", base):
        raise InstallError(f"{fname} already defines a --qat option (not added by this installer); nothing was changed")
    blocks = hook_blocks(base, fname)
    new = apply_blocks(base, blocks)
    try:
        compile(new, fname, "exec")
    except SyntaxError as e:
        raise InstallError(f"{fname} would not compile after adding the hooks (line {e.lineno}); nothing was changed")
    return new, [b for _, b in blocks]


# --------------------------------------------------------------------------------------------------
# Import check: every name the installed files take from the clone's modules must exist there.


def _optional(node_stack):
    """True inside `try: ... except ImportError/ModuleNotFoundError/Exception/bare:`."""
    for parent, child in zip(node_stack, node_stack[1:]):
        if isinstance(parent, ast.Try) and child in parent.body:
            for h in parent.handlers:
                names = [h.type] if not isinstance(h.type, ast.Tuple) else list(h.type.elts)
                if h.type is None or any(isinstance(n, ast.Name) and n.id in
                                         ("ImportError", "ModuleNotFoundError", "Exception") for n in names):
                    return True
    return False


def imports_of(path):
    """[(module, name or None, lineno, optional)] for absolute imports and `alias.attr` uses."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    out, aliases = [], {}

    def walk(node, stack):
        stack = stack + [node]
        if isinstance(node, ast.Import):
            for a in node.names:
                out.append((a.name, None, node.lineno, _optional(stack)))
                if a.asname:
                    aliases[a.asname] = a.name
                elif "." not in a.name:
                    aliases[a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for a in node.names:
                out.append((node.module, None if a.name == "*" else a.name, node.lineno, _optional(stack)))
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
              and isinstance(node.ctx, ast.Load)):
            out.append((aliases[node.value.id], node.attr, node.lineno, "attr"))
        for child in ast.iter_child_nodes(node):
            walk(child, stack)

    walk(tree, [])
    # `x.attr` only counts for names bound by a plain module import in this file
    return [(m, n, ln, opt) for m, n, ln, opt in out if opt != "attr" or m in aliases.values()]


def module_file(root, module):
    """The file defining `module` under `root` (a.b -> a/b.py or a/b/__init__.py), else None."""
    base = root.joinpath(*module.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def defined_names(root, module, _seen=None):
    """Top-level names of `module` in `root`: defs, classes, assignments, imports, star imports
    (followed inside `root`); submodules count as names of a package. None: could not tell."""
    _seen = set() if _seen is None else _seen
    path = module_file(root, module)
    if path is None or module in _seen:
        return set()
    _seen.add(module)
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError):
        return None
    names = set()

    def collect(body):
        for n in body:
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(n.name)
            elif isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                for t in (n.targets if isinstance(n, ast.Assign) else [n.target]):
                    names.update(x.id for x in ast.walk(t) if isinstance(x, ast.Name))
            elif isinstance(n, ast.Import):
                names.update((a.asname or a.name).split(".")[0] for a in n.names)
            elif isinstance(n, ast.ImportFrom):
                for a in n.names:
                    if a.name != "*":
                        names.add(a.asname or a.name)
                    elif n.level == 0 and n.module:
                        sub = defined_names(root, n.module, _seen)
                        if sub is None:
                            return None
                        names.update(x for x in sub if not x.startswith("_"))
            elif isinstance(n, (ast.If, ast.Try, ast.With)):
                for b in ("body", "orelse", "finalbody"):
                    if collect(getattr(n, b, [])) is None:
                        return None
                for h in getattr(n, "handlers", []):
                    collect(h.body)
        return names

    if collect(tree.body) is None:
        return None
    if path.name == "__init__.py":
        names.update(p.stem for p in path.parent.glob("*.py"))
        names.update(p.name for p in path.parent.iterdir() if (p / "__init__.py").is_file())
    return names


def check_imports(target, files, installed_tops, ours_there=()):
    """Check the installed files' imports against the clone. Returns the helper modules (paths
    relative to SOURCE_ROOT) to copy: ours, imported, and absent from the clone (or there only
    because an earlier install put them there: `ours_there`). Problems raise."""
    helpers, problems, queue, seen = [], [], list(files), set()
    while queue:
        src = queue.pop(0)
        if src in seen or src.suffix != ".py":
            continue
        seen.add(src)
        where = rel(src, SOURCE_ROOT)
        for module, name, lineno, optional in imports_of(src):
            top = module.split(".")[0]
            if optional is True or top in installed_tops:
                continue
            in_target = module_file(target, top) is not None
            if not in_target:
                if module_file(SOURCE_ROOT, top) is not None and top not in ("patches", "tests"):
                    problems.append(f"{where}:{lineno} imports {module}, which is part of yolov9-qat but not installed")
                continue  # a third-party package
            there = module_file(target, module)
            if there is None or rel(there, target) in ours_there:
                ours = module_file(SOURCE_ROOT, module)
                if ours is None or ours.name == "__init__.py":
                    problems.append(f"{where}:{lineno} imports {module}, which this YOLOv9 checkout lacks")
                else:
                    if ours not in helpers:
                        helpers.append(ours)
                    queue.append(ours)
                continue
            if name is None:
                continue
            full = f"{module}.{name}"
            if full in INCOMPATIBLE:
                problems.append(f"{where}:{lineno} uses {full}: {INCOMPATIBLE[full]}")
                continue
            names = defined_names(target, module)
            if names is not None and name not in names:
                problems.append(f"{where}:{lineno} uses {full}, which this YOLOv9 checkout does not define "
                                f"(import it from qat.compat)")
    if problems:
        raise InstallError(f"the installed tools would fail in this checkout: {'; '.join(problems)}; nothing was "
                           f"changed")
    return [rel(h, SOURCE_ROOT) for h in helpers]


# --------------------------------------------------------------------------------------------------
# Plan, install, uninstall


def source_files():
    """{relative path: bytes} of everything INSTALL_ITEMS and INSTALL_DATA hold in this checkout now,
    plus CLONE_REQUIREMENTS."""
    missing = [i for i in INSTALL_ITEMS + INSTALL_DATA + [REQUIREMENTS] if not (SOURCE_ROOT / i).exists()]
    if missing:
        raise InstallError(f"this yolov9-qat checkout ({SOURCE_ROOT}) has no {', '.join(missing)}; "
                           f"run the installer from a complete checkout")
    out = {CLONE_REQUIREMENTS: b"# yolov9-qat's packages (its requirements.txt), for this clone's environment:\n"
                               b"#   pip install -r " + CLONE_REQUIREMENTS.encode() + b"\n"
                               + (SOURCE_ROOT / REQUIREMENTS).read_bytes()}
    for item in INSTALL_ITEMS + INSTALL_DATA:
        p = SOURCE_ROOT / item
        paths = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())
        for f in paths:
            parts = f.relative_to(SOURCE_ROOT).parts
            if any(x in SKIP_NAMES for x in parts) or f.name.endswith(SKIP_SUFFIXES):
                continue
            out[rel(f, SOURCE_ROOT)] = f.read_bytes()
    return out


def check_hook_target():
    """The function train.py's hook calls must exist in the shipped qat/ and take its keywords."""
    path = module_file(SOURCE_ROOT, HOOK_MODULE)
    fn = None
    if path is not None:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        fn = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == HOOK_FUNC), None)
    if fn is None:
        raise InstallError(f"{HOOK_MODULE.replace('.', '/')}.py in {SOURCE_ROOT} defines no {HOOK_FUNC}(), which "
                           f"train.py --qat calls; nothing was changed")
    params = {a.arg for a in fn.args.args + fn.args.kwonlyargs}
    needed = {"opt", "hyp", "data_dict", "device"} - params
    if (len(fn.args.args) + (fn.args.vararg is not None) < 1) or (needed and fn.args.kwarg is None):
        raise InstallError(f"{HOOK_FUNC}() in {HOOK_MODULE} must take (model, opt=, hyp=, data_dict=, device=) "
                           f"as train.py --qat calls it; nothing was changed")


def check_target(target):
    if not target.is_dir():
        raise InstallError(f"{target} is not a folder; pass the root of your YOLOv9 clone")
    if target.resolve() == SOURCE_ROOT.resolve():
        raise InstallError(f"{target} is this yolov9-qat checkout itself; pass the root of an upstream YOLOv9 clone")
    missing = [f for f in UPSTREAM_FILES if not (target / f).is_file()]
    if missing:
        raise InstallError(f"{target} is not a YOLOv9 checkout (no {missing[0]}); pass the root of your YOLOv9 clone")
    marker_file, marker = UPSTREAM_MARKER
    if marker not in (target / marker_file).read_text(encoding="utf-8", errors="replace"):
        raise InstallError(f"{target} is not a YOLOv9 checkout ({marker_file} has no RepNCSPELAN4: YOLOv5/v7?)")
    if re.search(r"^\s*(from|import)\s+yolo9\.", (target / "train.py").read_text(encoding="utf-8", errors="replace"),
                 re.M):
        raise InstallError(f"{target} is the PyPI 'yolo9' package layout (imports yolo9.*), not a clone; "
                           f"install into a clone of upstream YOLOv9")


def load_manifest(target):
    p = target / MANIFEST
    if not p.is_file():
        return None
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
        assert isinstance(m.get("files"), dict) and isinstance(m.get("patched"), dict)
        return m
    except (ValueError, AssertionError):
        raise InstallError(f"{p} is damaged; restore train.py from train.py{BACKUP_SUFFIX} and delete {MANIFEST}")


def plan_hooks(target, old, writes):
    """The train.py hooks of an install: {file: its manifest record}; the patched text (and, the first
    time, the backup of the original) go into `writes`. `old`: the earlier install's manifest, or None."""
    patched = {}
    for fname in HOOKS:
        path, backup = target / fname, target / (fname + BACKUP_SUFFIX)
        raw = path.read_bytes()
        text = raw.decode("utf-8")
        rec = old["patched"].get(fname) if old else None
        if rec and sha256(raw) == rec["original_sha256"] and backup.is_file() and backup.read_bytes() == raw:
            base, original_sha = text, rec["original_sha256"]  # an install cut short before the patch step
        elif rec:
            base = remove_blocks(text, rec["blocks"])
            if base is None:
                raise InstallError(f"{fname} was edited since install and its --qat hook is no longer intact; "
                                   f"run --uninstall --force (restores {backup.name}), then install again")
            original_sha = rec["original_sha256"]
        else:
            if MARK in text:
                raise InstallError(f"{fname} already carries a yolov9-qat hook but {MANIFEST} does not record it; "
                                   f"restore the original {fname} (e.g. git checkout {fname}) and rerun")
            if backup.exists() and backup.read_bytes() != raw:
                raise InstallError(f"{backup} exists from an earlier install; restore or delete it and rerun")
            if not backup.exists():
                writes[backup.name] = raw
            base, original_sha = text, sha256(raw)
        new, blocks = patched_text(base, fname)
        if new != text:
            writes[fname] = new.encode("utf-8")
        patched[fname] = dict(backup=backup.name, original_sha256=original_sha, blocks=blocks,
                              sha256=sha256(new.encode("utf-8")))
    return patched


def plan_install(target, force=False):
    """Everything install would do, computed before anything is written: (writes, deletes, manifest).
    `writes` maps paths relative to `target` to their new bytes."""
    check_target(target)
    old = load_manifest(target)
    if not old:  # a clone with its own qat/ (or train_qat.py ...) is not ours to merge into
        for item in INSTALL_ITEMS + INSTALL_DATA + [CLONE_REQUIREMENTS]:
            if (target / item).exists():
                raise InstallError(f"{target / item} already exists and was not installed by this tool; move it "
                                   f"away and rerun")
    files = source_files()
    check_hook_target()
    helpers = check_imports(target, [SOURCE_ROOT / f for f in files], {Path(i).stem for i in INSTALL_ITEMS},
                            ours_there=set(old["files"]) if old else set())
    for h in helpers:
        files[h] = (SOURCE_ROOT / h).read_bytes()

    writes, deletes = {}, []
    old_files = old["files"] if old else {}
    # An update cut short leaves some files at their earlier installed version: still ours, not edits.
    earlier = old.get("previous", {}) if old else {}
    for f, data in files.items():
        dst = target / f
        if not dst.exists():
            writes[f] = data
            continue
        current = dst.read_bytes() if dst.is_file() else b""
        if current == data:
            continue
        if f not in old_files:
            raise InstallError(f"{dst} already exists and was not installed by this tool; move it away and rerun")
        if sha256(current) not in (old_files[f], earlier.get(f)) and not force:
            raise InstallError(f"{dst} was edited since it was installed; rerun with --force to overwrite it")
        writes[f] = data
    for f in old_files:
        if f not in files and (target / f).is_file():
            if sha256((target / f).read_bytes()) != old_files[f] and not force:
                raise InstallError(f"{target / f} (installed earlier, no longer shipped) was edited; "
                                   f"rerun with --force to remove it")
            deletes.append(f)

    patched = plan_hooks(target, old, writes)

    created = set(old.get("dirs", [])) if old else set()
    for f in files:
        parent = Path(f).parent
        while parent != Path("."):
            if not (target / parent).exists():
                created.add(parent.as_posix())
            parent = parent.parent
    manifest = dict(tool="yolov9-qat patches/install.py", format=1, helpers=sorted(helpers),
                    files={f: sha256(d) for f, d in sorted(files.items())}, dirs=sorted(created), patched=patched)
    m_bytes = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode("utf-8")
    if not old or (target / MANIFEST).read_bytes() != m_bytes:
        writes[MANIFEST] = m_bytes
    # What is on disk now for files this run replaces: if it is cut short, a rerun knows them as ours.
    manifest["previous"] = {f: sha256((target / f).read_bytes()) for f in writes
                            if f in files and (target / f).is_file()}
    return writes, deletes, manifest


def show_diff(target, fname, new):
    old = (target / fname).read_bytes().decode("utf-8")
    sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.decode("utf-8").splitlines(True),
                                               f"a/{fname}", f"b/{fname}", n=1))


def check_environment(target, python):
    """Run ENV_CHECK with the clone's Python: one line per known upstream breakage or missing package."""
    cmd = [python, str(SOURCE_ROOT / ENV_CHECK), str(target), str(target / CLONE_REQUIREMENTS)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return [f"could not run {python} to check the clone's environment ({e}); pass --python"]
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return [f"could not check the environment with {python} ({last}); pass the clone's Python with --python"]
    return [line for line in r.stdout.splitlines() if line.strip()]


def report_environment(target, python):
    problems = check_environment(target, python)
    if not problems:
        print(f"environment ({python}): ready (our packages installed, no known upstream breakage)")
        return
    print(f"environment ({python}): fix before running the tools:")
    for p in problems:
        print(f"  - {p}")


def install(target, dry_run=False, force=False, python=sys.executable):
    writes, deletes, manifest = plan_install(target, force)
    if not writes and not deletes:
        print(f"yolov9-qat is already installed in {target}; nothing changed")
        report_environment(target, python)
        return
    would = "would " if dry_run else ""
    copies = sorted(f for f in writes if f in manifest["files"])
    for f in copies:
        print(f"{would}{'update' if (target / f).exists() else 'copy'} {f}")
    for f in deletes:
        print(f"{would}remove {f} (no longer shipped)")
    for fname in HOOKS:
        if fname in writes:
            print(f"{would}patch {fname}: {', '.join(h['name'] for h in HOOKS[fname])} "
                  f"(original kept as {fname + BACKUP_SUFFIX})")
            if dry_run:
                show_diff(target, fname, writes[fname])
    if dry_run:
        print("dry run: nothing changed")
        return
    # Backup first, then the record, the copies and last the patch: a run cut short anywhere leaves
    # a state that a rerun completes and --uninstall undoes.
    for fname in HOOKS:
        if fname + BACKUP_SUFFIX in writes:
            write_atomic(target / (fname + BACKUP_SUFFIX), writes[fname + BACKUP_SUFFIX], mode_from=target / fname)
    if MANIFEST in writes:  # first the record (with what an update replaces), so a rerun can finish
        pending = dict(manifest, previous={**(load_manifest(target) or {}).get("previous", {}), **manifest["previous"]})
        write_atomic(target / MANIFEST, (json.dumps(pending, indent=1, sort_keys=True) + "\n").encode("utf-8"))
    for f in copies:
        write_atomic(target / f, writes[f], mode_from=SOURCE_ROOT / f if (SOURCE_ROOT / f).is_file() else None)
    for f in deletes:
        (target / f).unlink()
    _prune_dirs(target, manifest["dirs"], caches=False)
    for fname in HOOKS:
        if fname in writes:
            write_atomic(target / fname, writes[fname], mode_from=target / fname)
    if MANIFEST in writes:
        write_atomic(target / MANIFEST, writes[MANIFEST])  # complete: the final record
    helpers = f" and helper(s) {', '.join(manifest['helpers'])}" if manifest["helpers"] else ""
    print(f"installed yolov9-qat into {target}: {', '.join(INSTALL_ITEMS + INSTALL_DATA)}, {CLONE_REQUIREMENTS}"
          f"{helpers}; --qat hooked into {', '.join(HOOKS)}. Undo: python {Path(__file__).resolve()} {target} "
          f"--uninstall")
    report_environment(target, python)


def _prune_dirs(target, dirs, caches=True):
    """Remove the folders install created once they are empty (after their bytecode caches)."""
    for d in sorted(dirs, key=lambda d: -len(Path(d).parts)):
        p = target / d
        if not p.is_dir():
            continue
        if caches:
            for cache in (p / n for n in SKIP_NAMES):
                if cache.is_dir() and all(f.name.endswith(SKIP_SUFFIXES) for f in cache.rglob("*") if f.is_file()):
                    shutil.rmtree(cache)
        if not any(p.iterdir()):
            p.rmdir()


def uninstall(target, dry_run=False, force=False):
    if not target.is_dir():
        raise InstallError(f"{target} is not a folder; pass the root of your YOLOv9 clone")
    m = load_manifest(target)
    if m is None:
        if any((target / f).is_file() and MARK in (target / f).read_text(encoding="utf-8", errors="replace")
               for f in HOOKS):
            raise InstallError(f"{target} has a yolov9-qat hook but no {MANIFEST}; restore the original train.py "
                               f"by hand (e.g. git checkout train.py)")
        print(f"yolov9-qat is not installed in {target}; nothing changed")
        return
    restores = {}
    for fname, rec in m["patched"].items():
        path, backup = target / fname, target / rec["backup"]
        current = path.read_bytes() if path.is_file() else b""
        original = backup.read_bytes() if backup.is_file() else None
        if original is not None and sha256(original) != rec["original_sha256"]:
            original = None
        stripped = remove_blocks(current.decode("utf-8", errors="surrogateescape"), rec["blocks"])
        stripped = None if stripped is None else stripped.encode("utf-8", errors="surrogateescape")
        if sha256(current) == rec["original_sha256"]:
            continue  # already back to the original (e.g. git checkout train.py)
        if sha256(current) == rec["sha256"] and original is not None:
            restores[fname] = original  # untouched since install: the exact original bytes
        elif stripped is not None and sha256(stripped) == rec["original_sha256"]:
            restores[fname] = stripped  # the same bytes, the backup was lost
        elif stripped is not None:
            restores[fname] = stripped
            print(f"{fname} was edited after install: removing only the --qat hook, keeping the other edits")
        elif force and original is not None:
            restores[fname] = original
        else:
            raise InstallError(f"{fname} was edited after install and its --qat hook is no longer intact; "
                               + (f"rerun with --force to restore {rec['backup']} (your later edits are lost)"
                                  if original is not None else f"{rec['backup']} is gone too: fix {fname} by hand"))
    deletes, keep = [], []
    for f, digest in m["files"].items():
        p = target / f
        if p.is_file():
            ours = (digest, m.get("previous", {}).get(f))  # an update cut short: the earlier version is ours too
            (deletes if force or sha256(p.read_bytes()) in ours else keep).append(f)
    would = "would " if dry_run else ""
    for fname in restores:
        print(f"{would}restore {fname}")
    for f in deletes:
        print(f"{would}remove {f}")
    for f in keep:
        print(f"{would}keep {f}: edited since install (--force removes it)")
    if dry_run:
        print("dry run: nothing changed")
        return
    for fname, data in restores.items():
        write_atomic(target / fname, data, mode_from=target / fname)
    for rec in m["patched"].values():
        (target / rec["backup"]).unlink(missing_ok=True)
    for f in deletes:
        (target / f).unlink()
    _prune_dirs(target, m["dirs"])
    if keep:  # keep a record of what is left, so that a later --uninstall --force can finish
        m.update(files={f: m["files"][f] for f in keep}, patched={})
        write_atomic(target / MANIFEST, (json.dumps(m, indent=1, sort_keys=True) + "\n").encode("utf-8"))
        print(f"uninstalled yolov9-qat from {target} except {len(keep)} edited file(s) (see above)")
        return
    (target / MANIFEST).unlink()
    print(f"uninstalled yolov9-qat from {target}: {', '.join(restores) or 'nothing'} restored, "
          f"{len(deletes)} installed file(s) removed")


def parse_opt(argv=None):
    p = argparse.ArgumentParser(description="Install yolov9-qat's QAT tools (qat/, train_qat.py, export_qat.py, "
                                            "val_trt.py, train.py --qat) into an upstream YOLOv9 clone.")
    p.add_argument("target", help="root of the YOLOv9 clone (the folder with train.py, models/, utils/)")
    p.add_argument("--uninstall", action="store_true", help="restore the original files and remove the installed ones")
    p.add_argument("--dry-run", action="store_true", help="print what would change, change nothing")
    p.add_argument("--force", action="store_true", help="overwrite / remove installed files edited since install")
    p.add_argument("--python", default=sys.executable,
                   help="the Python that runs the clone (checked for our packages and known upstream breakages)")
    return p.parse_args(argv)


def main(argv=None):
    opt = parse_opt(argv)
    target = Path(opt.target).expanduser()
    try:
        if opt.uninstall:
            uninstall(target, dry_run=opt.dry_run, force=opt.force)
        else:
            install(target, dry_run=opt.dry_run, force=opt.force, python=opt.python)
    except InstallError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, UnicodeDecodeError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
