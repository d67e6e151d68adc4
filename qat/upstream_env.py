"""Known breakages of upstream YOLOv9's own code in a current Python environment, found before a run.

A fresh environment for a clone of WongKinYiu/yolov9 gets today's packages, and two of them break
upstream itself, not our tools: NumPy 2.4 removed `np.trapz` (upstream's utils/metrics.py calls it in
every evaluation, after a long calibration or fine-tune), and setuptools 81 removed `pkg_resources`
(upstream's utils/general.py imports it). Each problem is one line that says what to do.

Standard library only: patches/install.py runs this file as a script with the clone's Python
(`python qat/upstream_env.py <clone>` prints one problem per line), and qat.compat.run_cli calls
`find_problems` inside a clone before any command starts.
"""
import importlib.util
import re
import sys
from pathlib import Path

# (clone file, pattern of the use, module, attribute that must exist, the fix)
KNOWN_BREAKAGES = [
    ("utils/metrics.py", r"^[^#\n]*\bnp\.trapz\s*\(", "numpy", "trapz",
     "pip install 'numpy<2.4' (or change np.trapz to np.trapezoid in utils/metrics.py)"),
    ("utils/general.py", r"^\s*(import\s+pkg_resources|from\s+pkg_resources\s+import)", "pkg_resources", None,
     "pip install 'setuptools<81' (setuptools 81 removed pkg_resources)"),
]


def _version(module):
    try:
        from importlib.metadata import version
        return version({"pkg_resources": "setuptools"}.get(module, module))
    except Exception:
        return "?"


def find_problems(clone_root):
    """One line per known upstream breakage that this Python would hit in the clone at `clone_root`."""
    root, out = Path(clone_root), []
    for rel, pattern, module, attr, fix in KNOWN_BREAKAGES:
        f = root / rel
        try:
            text = f.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        if not re.search(pattern, text, re.M):
            continue
        if importlib.util.find_spec(module) is None:
            out.append(f"{rel} imports {module}, which this Python ({sys.executable}) lacks "
                       f"(setuptools {_version(module)}): {fix}")
        elif attr is not None:
            mod = __import__(module)
            if not hasattr(mod, attr):
                out.append(f"{rel} calls {module}.{attr}, which {module} {_version(module)} no longer has: {fix}")
    return out


def missing_packages(requirements):
    """Requirement lines of the file `requirements` that this Python lacks (or has at another `==` pin)."""
    from importlib.metadata import PackageNotFoundError, version
    out = []
    for line in Path(requirements).read_text(encoding="utf-8").splitlines():
        spec = line.split("#", 1)[0].strip()
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:(==|>=|<=|~=|!=|<|>)\s*([^\s;,]+))?", spec)
        if not m:
            continue
        name, op, want = m.groups()
        try:
            have = version(name)
        except PackageNotFoundError:
            out.append(spec)
            continue
        if op == "==" and have != want:
            out.append(f"{spec} (installed: {have})")
    return out


if __name__ == "__main__":  # python qat/upstream_env.py <clone> [requirements file]
    lines = find_problems(sys.argv[1] if len(sys.argv) > 1 else ".")
    if len(sys.argv) > 2:
        missing = missing_packages(sys.argv[2])
        if missing:
            lines.append(f"missing packages: {', '.join(missing)}: pip install -r {sys.argv[2]}")
    print("\n".join(lines))
