"""Install detectron2's Python code into the running interpreter when it is not importable.

detectron2 has no wheel for this Python on the package registry under its own name. The
``sal-detectron2==0.7.2`` wheel (sha256 ``WHEEL_SHA256`` below) is upstream detectron2 at commit
a59f0563 ("rc4 qat finetune data loading") repackaged by a third party for CPython 3.10: compared
with that commit its ``detectron2`` package differs only in ``__version__`` ("0.7.2"), one line of
``data/common.py`` (``random.sample`` on a list, for Python 3.11), an extra test helper in
``utils/testing.py``, the copies of ``configs/`` and three ``projects/`` that detectron2's own
setup.py adds, and its compiled ``_C`` (CPython 3.10, which this project does not need). Its
Python code runs on 3.11+. pip refuses the wheel's tag on other Pythons, so this script downloads
it, checks its sha256 (a mismatch stops with both hashes, before anything is unpacked) and places
the ``detectron2`` package and its dist-info in site-packages (``pip show``/``pip uninstall``
work).

An importable detectron2 is never replaced: to use your own, install it first, e.g. from a clone
of https://github.com/facebookresearch/detectron2 with
``python -m pip install --no-build-isolation -e detectron2``.
"""

import argparse
import hashlib
import importlib.util
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

WHEEL = "sal-detectron2==0.7.2"
WHEEL_FILE = "sal_detectron2-0.7.2-cp310-none-any.whl"
# of WHEEL_FILE as the package registry serves it (and lists it in its index)
WHEEL_SHA256 = "491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561"
# detectron2's runtime requirements (its metadata lists them for the binary build).
REQUIREMENTS = [
    "Pillow",
    "matplotlib",
    "pycocotools",
    "termcolor",
    "yacs",
    "tabulate",
    "cloudpickle",
    "tqdm",
    "tensorboard",
    "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7,<0.1.10",
    "omegaconf>=2.1,<2.4",
    "hydra-core>=1.1",
    "black",
    "packaging",
    # detectron2.utils.visualizer imports OpenCV.
    "opencv-python-headless",
    # detectron2.model_zoo imports pkg_resources, removed from setuptools 81.
    "setuptools>=64,<81",
]


def _pip(*args: str) -> None:
    command = [sys.executable, "-m", "pip", *args]
    print("[install_detectron2] " + " ".join(command), flush=True)
    subprocess.run(command, check=True)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_wheel(wheel: Path, expected: str = WHEEL_SHA256) -> None:
    """Raise SystemExit naming both hashes when ``wheel``'s sha256 is not ``expected``."""
    actual = sha256_of(wheel)
    if actual != expected:
        raise SystemExit(
            f"[install_detectron2] {wheel} has sha256 {actual}, expected {expected}: not "
            f"installed. Install detectron2 yourself (see this script's doc) and rerun."
        )
    print(f"[install_detectron2] {wheel.name}: sha256 {actual} verified", flush=True)


def extract(wheel: Path, site_packages: Path) -> None:
    """Place the wheel's ``detectron2`` package and dist-info in ``site_packages``."""
    with zipfile.ZipFile(wheel) as archive:
        members = [
            name
            for name in archive.namelist()
            if name.startswith("detectron2/") or ".dist-info/" in name.split("/", 1)[0] + "/"
        ]
        # The wheel also carries a top-level ``tools/`` folder: it must not land in site-packages.
        members = [name for name in members if not name.startswith("tools/")]
        archive.extractall(site_packages, members=members)
    print(f"[install_detectron2] placed detectron2 in {site_packages}", flush=True)


def download(dest: Path) -> Path:
    _pip(
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.10",
        "--implementation",
        "cp",
        "--dest",
        str(dest),
        WHEEL,
    )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one downloaded wheel in {dest}, found {wheels}")
    return wheels[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="install even if importable")
    parser.add_argument(
        "--wheel", type=Path, help=f"a local copy of {WHEEL_FILE} instead of downloading it"
    )
    parser.add_argument(
        "--target", type=Path, help="where to unpack (default: this interpreter's site-packages)"
    )
    parser.add_argument(
        "--no-requirements", action="store_true", help="do not pip install the requirements"
    )
    args = parser.parse_args(argv)
    if importlib.util.find_spec("detectron2") is not None and not args.force:
        print("[install_detectron2] detectron2 is importable: kept as it is", flush=True)
        return 0
    site_packages = args.target or Path(sysconfig.get_paths()["purelib"])
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or download(Path(tmp))
        verify_wheel(wheel, WHEEL_SHA256)
        if not args.no_requirements:
            _pip("install", "--quiet", *REQUIREMENTS)
        extract(wheel, site_packages)
    return 0


if __name__ == "__main__":
    sys.exit(main())
