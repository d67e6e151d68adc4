"""Known breakages of upstream YOLOv9's own code in a current Python environment, found before a run.

A fresh environment for a clone of WongKinYiu/yolov9 gets today's packages, and two of them break
upstream itself, not our tools: NumPy 2.4 removed `np.trapz` (upstream's utils/metrics.py calls it in
every evaluation, after a long calibration or fine-tune), and setuptools 81 removed `pkg_resources`
(upstream's utils/general.py imports it). On a machine without internet, upstream's check_dataset
dies downloading the Arial.ttf font it draws plots with. Each problem is one line that says what to do.

Standard library only: patches/install.py runs this file as a script with the clone's Python
(`python qat/upstream_env.py <clone>` prints one problem per line), and qat.compat.run_cli calls
`find_problems` inside a clone before any command starts.
"""
import importlib.util
import os
import platform
import re
import socket
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
    font = _font_problem(root)
    return out + ([font] if font else [])


def _font_problem(root):
    """Upstream's check_font downloads the font (no try/except) when it is not in its config folder."""
    try:
        text = (root / "utils" / "general.py").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    m = re.search(r"^def check_font\(.*?(?=^\S)", text, re.M | re.S)
    if not m or "download_url_to_file" not in m.group(0) or re.search(r"^\s+try:", m.group(0), re.M):
        return None
    sub = {"Windows": "AppData/Roaming", "Darwin": "Library/Application Support"}.get(platform.system(), ".config")
    folder = Path(os.getenv("YOLOV5_CONFIG_DIR") or Path.home() / sub / "Ultralytics")  # upstream's user_config_dir
    if (folder / "Arial.ttf").is_file():
        return None
    try:
        socket.getaddrinfo("ultralytics.com", 443)
        return None
    except OSError:
        return (f"upstream's check_dataset downloads Arial.ttf from ultralytics.com, which this machine cannot reach: "
                f"copy any .ttf font to {folder / 'Arial.ttf'} (e.g. matplotlib's mpl-data/fonts/ttf/DejaVuSans.ttf)")


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
