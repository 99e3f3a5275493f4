"""The GPU kit (scripts/gpu_kit.py): what it carries is pinned, and Ray's slimmed archive
keeps every file a worker needs, with its mode, and nothing under the dropped folders."""

from __future__ import annotations

import importlib.util
import json
import stat
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _kit():
    spec = importlib.util.spec_from_file_location("gpu_kit", ROOT / "scripts" / "gpu_kit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_everything_carried_is_pinned_by_the_lock():
    kit = _kit()
    pins = kit.locked_versions()
    assert pins["ray"] and pins["optuna"]
    assert [n for n in (*kit.CARRY, kit.RAY) if n not in pins] == []


def test_ray_archive_drops_the_slimmed_folders_and_keeps_modes(tmp_path):
    kit = _kit()
    wheel = tmp_path / "ray-9.9.9-cp312-cp312-manylinux2014_x86_64.whl"
    members = {
        "ray/__init__.py": (b"version = 1\n", 0o644),
        "ray/core/src/ray/raylet/raylet": (b"\x7fELF", 0o755),
        "ray/jars/ray_dist.jar": (b"jar", 0o644),
        "ray/rllib/__init__.py": (b"", 0o644),
        "ray-9.9.9.dist-info/METADATA": (b"Name: ray\n", 0o644),
    }
    with zipfile.ZipFile(wheel, "w") as z:
        for name, (data, mode) in members.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFREG | mode) << 16
            z.writestr(info, data)
    out = kit.ray_archive(wheel, tmp_path)
    assert out.name == "ray-9.9.9.tar.xz"
    with tarfile.open(out) as tar:
        kept = {m.name: m.mode for m in tar.getmembers()}
        assert tar.extractfile("ray/__init__.py").read() == b"version = 1\n"
    assert kept == {
        "ray/__init__.py": 0o644,
        "ray/core/src/ray/raylet/raylet": 0o755,
        "ray-9.9.9.dist-info/METADATA": 0o644,
    }


def test_a_carried_zoo_is_adopted_under_this_machines_key(tmp_path, monkeypatch):
    from evomerge.zoo.build import MANIFEST, default_zoo_dir, read_manifest, version

    kit = _kit()
    carried = tmp_path / "zoo" / "test-0123456789ab"  # trained under other libraries
    (carried / "base").mkdir(parents=True)
    (carried / MANIFEST).write_text(json.dumps({"size": "test", "version": "0123456789ab"}))
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path))
    target = kit.adopt_zoo()
    assert target == default_zoo_dir("test") != carried
    assert read_manifest(target) == {"size": "test", "version": version("test")}
    assert (target / "base").is_dir() and not carried.exists()
    assert kit.adopt_zoo() == target  # a second call (a rerun) changes nothing
