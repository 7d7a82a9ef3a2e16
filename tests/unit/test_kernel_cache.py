"""The C++ kernel cache loads only a library this user built: a planted library is never loaded (its constructor
would leave a marker file), a shared or foreign cache directory is refused, an empty or truncated library is rebuilt,
and parallel builders end with one verified library."""

import logging
import os
import stat
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from seqrec.kernels import cache

pytestmark = pytest.mark.skipif(cache.compiler() is None, reason="no C++ compiler")

FLAGS = ["-O0", "-shared", "-fPIC"]
NOBODY = 65534


@pytest.fixture
def kernel_cache(tmp_path, monkeypatch):
    """An empty cache root under tmp_path and a tiny source to build: returns (root, source)."""
    root = tmp_path / "cache"
    monkeypatch.setenv(cache.CACHE_ENV, str(root))
    monkeypatch.setattr(cache, "_private_fallback", None)
    source = tmp_path / "answer.cpp"
    source.write_text('extern "C" int answer() { return 42; }\n')
    return root, source


def plant(directory, path, marker):
    """Compile a library whose constructor creates `marker` (proof that it ran) to `path`."""
    directory.mkdir(parents=True, exist_ok=True)
    evil = directory.parent / "evil.cpp"
    evil.write_text(
        "#include <cstdio>\n"
        f'__attribute__((constructor)) static void planted() {{ std::fclose(std::fopen("{marker}", "w")); }}\n'
        'extern "C" int answer() { return 666; }\n'
    )
    subprocess.run([cache.compiler(), *FLAGS, str(evil), "-o", str(path)], check=True)


def libraries(directory):
    return sorted(directory.glob("answer-*.so"))


def test_a_fresh_cache_is_private_and_records_the_digest(kernel_cache):
    root, source = kernel_cache
    assert cache.load_library("answer", source, FLAGS).answer() == 42
    directory = root / "kernels"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    [library] = libraries(directory)
    [pointer] = directory.glob("answer-*.sha256")
    digest = pointer.read_text().strip()
    assert digest == cache._sha256(library) and library.name.endswith(f"-{digest[:32]}.so")
    assert not [p for p in directory.iterdir() if p.name.startswith(".tmp-")]  # no temporary left behind
    mtime = library.stat().st_mtime_ns
    assert cache.build("answer", source, FLAGS) == library
    assert library.stat().st_mtime_ns == mtime  # reused, not rebuilt


# Each test builds with cache.build() first, as an earlier process would have: a library loaded into this process
# cannot be replaced or damaged under it (the loader reuses the mapping of an already-loaded path).


def test_a_planted_library_with_a_wrong_digest_is_not_loaded(kernel_cache, tmp_path, caplog):
    root, source = kernel_cache
    cache.build("answer", source, FLAGS)  # the pointer names the genuine library
    directory = root / "kernels"
    [library] = libraries(directory)
    marker = tmp_path / "planted-library-ran"
    plant(directory, library, marker)  # replaced under the genuine name: its digest no longer matches
    with caplog.at_level(logging.WARNING):
        lib = cache.load_library("answer", source, FLAGS)
    assert not marker.exists()
    assert lib.answer() == 42
    assert any("does not match its digest" in r.message for r in caplog.records)


def test_a_planted_library_and_pointer_owned_by_someone_else_are_not_loaded(kernel_cache, tmp_path):
    if os.getuid() != 0:
        pytest.skip("needs root to give files to another user")
    root, source = kernel_cache
    cache.build("answer", source, FLAGS)
    directory = root / "kernels"
    [library] = libraries(directory)
    [pointer] = directory.glob("answer-*.sha256")
    marker = tmp_path / "planted-library-ran"
    plant(directory, library, marker)
    pointer.write_text(cache._sha256(library) + "\n")  # a consistent pair, but not ours
    library.rename(directory / f"{pointer.stem}-{pointer.read_text()[:32]}.so")
    for path in directory.iterdir():
        os.chown(path, NOBODY, NOBODY)
    assert cache.load_library("answer", source, FLAGS).answer() == 42
    assert not marker.exists()


def test_a_world_writable_cache_dir_is_refused(kernel_cache, tmp_path, caplog):
    root, source = kernel_cache
    directory = root / "kernels"
    marker = tmp_path / "planted-library-ran"
    cache.build("answer", source, FLAGS)
    [library] = libraries(directory)
    plant(directory, library, marker)
    [pointer] = directory.glob("answer-*.sha256")
    pointer.write_text(cache._sha256(library) + "\n")  # consistent, but anyone could have written it
    library.rename(directory / f"{pointer.stem}-{pointer.read_text()[:32]}.so")
    os.chmod(directory, 0o777)
    with caplog.at_level(logging.WARNING):
        assert cache.load_library("answer", source, FLAGS).answer() == 42
        cache.load_library("answer", source, FLAGS)
    assert not marker.exists()
    refusals = [r.message for r in caplog.records if "kernel cache refused" in r.message]
    assert len(refusals) == 1 and "writable by others" in refusals[0]  # one warning per process
    assert cache.kernel_dir() != directory and stat.S_IMODE(cache.kernel_dir().stat().st_mode) == 0o700


def test_a_cache_dir_owned_by_someone_else_is_refused(kernel_cache, caplog):
    if os.getuid() != 0:
        pytest.skip("needs root to give a directory to another user")
    root, source = kernel_cache
    (root / "kernels").mkdir(parents=True, mode=0o700)
    os.chown(root / "kernels", NOBODY, NOBODY)
    with caplog.at_level(logging.WARNING):
        assert cache.load_library("answer", source, FLAGS).answer() == 42
    assert any("owned by uid 65534" in r.message for r in caplog.records)
    assert not list((root / "kernels").iterdir())


@pytest.mark.parametrize("damage", ["truncate", "empty", "delete"])
def test_a_damaged_library_is_rebuilt(kernel_cache, damage):
    root, source = kernel_cache
    cache.build("answer", source, FLAGS)
    [library] = libraries(root / "kernels")
    size = library.stat().st_size
    if damage == "delete":
        library.unlink()
    else:
        os.truncate(library, size // 2 if damage == "truncate" else 0)
    assert cache.load_library("answer", source, FLAGS).answer() == 42
    assert library.stat().st_size == size


def test_parallel_builders_end_with_one_verified_library(kernel_cache):
    root, source = kernel_cache
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: cache.load_library("answer", source, FLAGS).answer(), range(4)))
    assert answers == [42] * 4
    directory = root / "kernels"
    [pointer] = directory.glob("answer-*.sha256")
    assert [cache._sha256(p) for p in libraries(directory)] == [pointer.read_text().strip()]
    assert not [p for p in directory.iterdir() if p.name.startswith(".tmp-")]
