"""The version is written once (Cargo.toml's workspace version: maturin's and ``__version__``), and the
installed package carries its types (PEP 561: ``py.typed`` and the stub of ``_core``)."""

import importlib.metadata
import pathlib
import re

import picklegate

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_version_is_the_cargo_workspace_version():
    cargo = (REPO / "Cargo.toml").read_text()
    workspace = cargo[cargo.index("[workspace.package]"):]
    (version,) = re.findall(r'^version = "([^"]+)"$', workspace.split("\n[", 1)[0], re.M)
    assert picklegate.__version__ == version
    assert importlib.metadata.version("picklegate") == version


def test_installed_package_carries_its_types():
    package = pathlib.Path(picklegate.__file__).parent
    assert (package / "py.typed").is_file()
    stub = (package / "_core.pyi").read_text()
    assert "def guarded_load(" in stub and "class PinnedFile" in stub
