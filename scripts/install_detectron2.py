"""Install detectron2's Python code into the running interpreter when it is not importable.

detectron2 has no wheel for this Python on the package registry under its own name. The
``sal-detectron2==0.7.2`` wheel carries upstream detectron2 (commit a59f0563) for CPython 3.10;
its Python code runs on 3.11+ without the compiled ``_C`` (which this project does not need).
pip refuses the wheel's tag on other Pythons, so this script downloads it and places the
``detectron2`` package and its dist-info in site-packages (``pip show``/``pip uninstall`` work).
An importable detectron2 is never replaced.
"""

import argparse
import importlib.util
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

WHEEL = "sal-detectron2==0.7.2"
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


def _extract(wheel: Path, site_packages: Path) -> None:
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="install even if importable")
    args = parser.parse_args()
    if importlib.util.find_spec("detectron2") is not None and not args.force:
        print("[install_detectron2] detectron2 is importable: kept as it is", flush=True)
        return 0
    _pip("install", "--quiet", *REQUIREMENTS)
    site_packages = Path(sysconfig.get_paths()["purelib"])
    with tempfile.TemporaryDirectory() as tmp:
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
            tmp,
            WHEEL,
        )
        wheels = sorted(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"expected one downloaded wheel in {tmp}, found {wheels}")
        _extract(wheels[0], site_packages)
    return 0


if __name__ == "__main__":
    sys.exit(main())
