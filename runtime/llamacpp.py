"""llama.cpp's tools from a package: ``python -m runtime llama-cpp build|where``.

``build`` downloads the llama-cpp-python sdist (:data:`PINNED_VERSION`) from PyPI with pip
(``pip download llama-cpp-python==VERSION --no-deps --no-binary :all:``), unpacks the llama.cpp tree it
vendors into the cache directory (default ``cache/llama.cpp`` of the repository, git-ignored) and builds the
CPU-only tools moecc uses (:data:`TOOLS`) with CMake and Ninja into ``DIR/build/bin``. The directory is then
laid out like a llama.cpp checkout: ``convert_hf_to_gguf.py`` and ``gguf-py/`` at its top, the tools in
``build/bin``. A finished build leaves :data:`STAMP`; a second ``build`` finds it and the tools and reuses
them (``--force`` rebuilds).

Every consumer finds the tools through :func:`resolve`: an explicit directory (``--llama-cpp DIR``), else
the environment variable :data:`ENV_VAR`, else the default cache directory. ``DIR`` may be a llama.cpp
checkout (tools in ``DIR/build/bin``) or a directory holding the tools themselves (``DIR/bin`` or ``DIR``).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from optimizer.errors import InputError

#: the llama-cpp-python release whose vendored llama.cpp is built (checked end to end on R3, issue 16)
PINNED_VERSION = "0.3.36"
PACKAGE = "llama-cpp-python"
#: the tools moecc runs
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench")
#: environment variable naming the llama.cpp directory (overridden by ``--llama-cpp``)
ENV_VAR = "MOECC_LLAMA_CPP"
#: written into DIR by a finished build
STAMP = "moecc_llama_cpp.json"
#: CMake options of the CPU-only build
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_METAL=OFF", "-DGGML_CUDA=OFF", "-DGGML_VULKAN=OFF")
_BUILD_HINT = "build them with `python -m runtime llama-cpp build` (or give --llama-cpp DIR / set MOECC_LLAMA_CPP)"


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def default_dir() -> Path:
    """Where ``build`` puts llama.cpp when no directory is given: ``cache/llama.cpp`` of the repository."""
    return repo_root() / "cache" / "llama.cpp"


@dataclass(frozen=True)
class LlamaCpp:
    """A llama.cpp installation: its tool directory and (when it is a source tree) the converter."""

    root: Path
    bin: Path

    def tool(self, name: str) -> Path:
        """Path of tool ``name`` (``llama-quantize``...); InputError if it is not built."""
        for candidate in (self.bin / name, self.bin / f"{name}.exe"):
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
        raise InputError(f"llama.cpp tool {name} not found in {self.bin}; {_BUILD_HINT}")

    @property
    def converter(self) -> Path:
        """``convert_hf_to_gguf.py`` of the source tree; InputError if ``root`` is not one."""
        path = self.root / "convert_hf_to_gguf.py"
        if not path.is_file():
            raise InputError(f"{self.root} has no convert_hf_to_gguf.py (a llama.cpp source tree is needed to "
                             f"convert checkpoints); {_BUILD_HINT}")
        return path

    @property
    def gguf_py(self) -> Path:
        """The tree's own ``gguf-py`` (the converter needs the matching version)."""
        return self.root / "gguf-py"

    def converter_env(self) -> dict[str, str]:
        """Environment for running the converter with the tree's gguf-py first on the path."""
        path = os.pathsep.join(p for p in (str(self.gguf_py), os.environ.get("PYTHONPATH", "")) if p)
        return {**os.environ, "PYTHONPATH": path}


def _bin_dir(root: Path) -> Path:
    for candidate in (root / "build" / "bin", root / "bin", root):
        if any((candidate / t).is_file() for t in TOOLS):
            return candidate
    return root / "build" / "bin"


def resolve(explicit: str | Path | None = None, tools: tuple[str, ...] = (), converter: bool = False) -> LlamaCpp:
    """The llama.cpp every consumer uses: ``explicit``, else ``$MOECC_LLAMA_CPP``, else :func:`default_dir`.

    ``tools`` (and the converter, with ``converter``) must be present, else an InputError names the missing
    piece and the command that builds it.
    """
    source = "--llama-cpp" if explicit else (ENV_VAR if os.environ.get(ENV_VAR) else None)
    root = Path(explicit or os.environ.get(ENV_VAR) or default_dir()).expanduser()
    if not root.is_dir():
        where = f"{source} {root}" if source else f"{root} (the default)"
        raise InputError(f"no llama.cpp at {where}; {_BUILD_HINT}")
    found = LlamaCpp(root.resolve(), _bin_dir(root.resolve()))
    for t in tools:
        found.tool(t)
    if converter:
        _ = found.converter
    return found


def built(root: Path) -> bool:
    """Whether ``root`` holds a finished build of this version (stamp and every tool)."""
    try:
        stamp = json.loads((root / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(stamp, dict) and stamp.get("version") == PINNED_VERSION
            and all((root / "build" / "bin" / t).is_file() for t in TOOLS))


def _is_tree(root: Path) -> bool:
    """Whether ``root`` is a llama.cpp source tree (the only kind of directory ``build`` replaces)."""
    return all((root / p).exists() for p in ("CMakeLists.txt", "convert_hf_to_gguf.py", "ggml", "gguf-py"))


def _say(msg: str) -> None:
    print(f"[llama-cpp] {msg}", flush=True)


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    """Run ``cmd``, its output streamed (ninja's ``[n/N]`` lines are the progress); raise on failure."""
    _say("$ " + " ".join(cmd))
    res = subprocess.run(cmd, cwd=cwd)
    if res.returncode:
        raise RuntimeError(f"{cmd[0]} failed with exit code {res.returncode}")


def run_tool(name: str, cmd: list[str], log: Path, prefix: str, env: dict[str, str] | None = None,
             progress: Callable[[str], None] | None = None) -> str:
    """Run one llama.cpp step (a tool, or the converter with ``env``), its output streamed to ``log`` and, as it
    grows, to ``progress``; ``[prefix] name: ...`` lines say what runs and how long it took. Returns the output;
    a failure raises RuntimeError with the log's tail."""
    print(f"[{prefix}] {name}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    chunks: list[str] = []
    with open(log, "w", encoding="utf-8") as fh, subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env) as proc:
        assert proc.stdout is not None  # PIPE was asked for
        while piece := proc.stdout.read1(8192):  # type: ignore[attr-defined]
            text = piece.decode("utf-8", errors="replace")
            chunks.append(text)
            fh.write(text)
            if progress is not None:
                progress("".join(chunks))
        code = proc.wait()
    out = "".join(chunks)
    if code:
        tail = " | ".join(out.strip().splitlines()[-8:])
        raise RuntimeError(f"{name} failed (exit code {code}); log {log}: {tail}")
    print(f"[{prefix}] {name}: done in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def _download(version: str, dest: Path) -> Path:
    """``pip download`` the sdist into ``dest``; its path."""
    _run([sys.executable, "-m", "pip", "download", f"{PACKAGE}=={version}", "--no-deps", "--no-binary", ":all:",
          "-d", str(dest)])
    found = sorted(dest.glob("llama_cpp_python-*.tar.gz")) or sorted(dest.glob("llama-cpp-python-*.tar.gz"))
    if not found:
        raise RuntimeError(f"pip download left no {PACKAGE} sdist in {dest}")
    return found[0]


def _unpack_vendor(sdist: Path, dest: Path) -> None:
    """Extract the sdist's ``*/vendor/llama.cpp/`` into ``dest`` (which becomes the llama.cpp tree)."""
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            parts = m.name.split("/")
            if len(parts) > 3 and parts[1:3] == ["vendor", "llama.cpp"] and (m.isfile() or m.isdir()):
                m.name = "/".join(parts[3:])
                members.append(m)
        if not members:
            raise RuntimeError(f"{sdist.name} holds no vendor/llama.cpp")
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, members=members, **kwargs)
    _say(f"unpacked {len(members)} files of llama.cpp into {dest}")


def build(dest: str | Path | None = None, jobs: int | None = None, force: bool = False,
          version: str = PINNED_VERSION) -> LlamaCpp:
    """Download, unpack and build the tools into ``dest`` (default :func:`default_dir`); reuse a finished build."""
    if jobs is not None and not 1 <= jobs <= 1024:
        raise InputError(f"--jobs: {jobs} is not between 1 and 1024")
    root = Path(dest or default_dir()).expanduser().resolve()
    if built(root) and not force and version == PINNED_VERSION:
        _say(f"reusing the build in {root} (llama-cpp-python {PINNED_VERSION}; --force rebuilds)")
        return resolve(root, TOOLS, converter=True)
    for exe in ("cmake", "ninja"):
        if shutil.which(exe) is None:
            raise InputError(f"{exe} is not installed; it is needed to build llama.cpp "
                             "(e.g. `apt-get install cmake ninja-build` or `pip install cmake ninja`)")
    if root.exists() and (not root.is_dir() or (not _is_tree(root) and any(root.iterdir()))):
        raise InputError(f"{root} exists and is not a llama.cpp tree; give another --cache directory")
    t0 = time.perf_counter()
    if not _is_tree(root) or force:
        root.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".llama-cpp-", dir=root.parent) as tmp:
            _say(f"downloading {PACKAGE}=={version} (sdist) from PyPI")
            sdist = _download(version, Path(tmp) / "dl")
            tree = Path(tmp) / "tree"
            _unpack_vendor(sdist, tree)
            if root.exists():
                shutil.rmtree(root)
            tree.rename(root)
    else:
        _say(f"source tree already in {root}; building")
    (root / STAMP).unlink(missing_ok=True)
    build_dir = root / "build"
    _run(["cmake", "-S", str(root), "-B", str(build_dir), "-G", "Ninja", *CMAKE_FLAGS])
    _run(["cmake", "--build", str(build_dir), "-j", str(jobs or os.cpu_count() or 1), "--target", *TOOLS])
    seconds = time.perf_counter() - t0
    (root / STAMP).write_text(json.dumps({"schema": "moecc.llama_cpp_build", "version": version, "package": PACKAGE,
                                          "tools": list(TOOLS), "cmake_flags": list(CMAKE_FLAGS),
                                          "jobs": jobs, "seconds": round(seconds, 1)}, indent=1) + "\n",
                              encoding="utf-8")
    _say(f"built {', '.join(TOOLS)} in {build_dir / 'bin'} ({seconds / 60:.1f} min)")
    return resolve(root, TOOLS, converter=True)
