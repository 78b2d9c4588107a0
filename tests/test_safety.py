"""Never lose a user's files: output-directory rules, staged writes, recovery after a killed
build (real builds of the tiny preset, killed with SIGKILL and SIGTERM at several moments)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import build
import hf_llama_convert
from llama_engine import outdir

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model_config", "tiny", "--dtype", "float32", "--max_input_len", "16",
        "--max_output_len", "8"]


def tiny_build(out, seed=0, *extra) -> int:
    return build.main([*TINY, "--seed", str(seed), "--output_dir", str(out), *extra])


def weights(d) -> dict:
    """The tensors' bytes by name (the file's metadata order varies between processes)."""
    from safetensors.torch import load_file
    return {k: v.numpy().tobytes() for k, v in load_file(Path(d) / "rank0.safetensors").items()}


def leftovers(parent) -> list[str]:
    return sorted(p for p in os.listdir(parent) if p.startswith((".tmp-", ".ready-", ".old-")))


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """Two complete tiny engines (seeds 0 and 1): their weights tell old from new."""
    d = tmp_path_factory.mktemp("ref")
    assert tiny_build(d / "old", 0) == 0 and tiny_build(d / "new", 1) == 0
    return {"old": weights(d / "old"), "new": weights(d / "new")}


def user_dir(path: Path) -> Path:
    path.mkdir()
    (path / "notes.txt").write_text("my notes")
    return path


# -- the rules ---------------------------------------------------------------------------------
def test_directory_of_user_files_is_refused_and_kept(tmp_path, capsys):
    notes = user_dir(tmp_path / "notes")
    assert tiny_build(notes) == 2
    assert error_line(capsys) == (
        f"error: --output_dir {notes} exists and holds no engine or checkpoint written by this "
        "project; choose a new directory or pass --force to replace it")
    assert (notes / "notes.txt").read_text() == "my notes"
    assert leftovers(tmp_path) == []


def test_force_replaces_a_user_directory(tmp_path, engines):
    notes = user_dir(tmp_path / "notes")
    assert tiny_build(notes, 0, "--force") == 0
    assert sorted(os.listdir(notes)) == ["config.json", "rank0.safetensors"]
    assert weights(notes) == engines["old"]


def test_own_engine_is_replaced(tmp_path, engines):
    assert tiny_build(tmp_path / "e", 0) == 0 and tiny_build(tmp_path / "e", 1) == 0
    assert weights(tmp_path / "e") == engines["new"]
    assert leftovers(tmp_path) == []


def test_source_dir_is_refused_even_with_force(tiny_hf_factory, tmp_path, capsys):
    src = tmp_path / "hf"
    src.mkdir()
    for f in os.listdir(tiny_hf_factory(2, False)):
        (src / f).write_bytes((tiny_hf_factory(2, False) / f).read_bytes())
    before = sorted(os.listdir(src))
    capsys.readouterr()  # the factory's progress bars
    for out in (src, tmp_path):  # the source itself, a folder holding it
        rc = build.main(["--model_dir", str(src), "--dtype", "float32", "--output_dir", str(out),
                         "--force"])
        assert rc == 2
        assert error_line(capsys) == (f"error: --output_dir {out} is the source {src} or holds "
                                      "it; choose a new directory")
    assert sorted(os.listdir(src)) == before


def test_current_directory_is_refused(tmp_path, monkeypatch, capsys):
    work = user_dir(tmp_path / "work")
    monkeypatch.chdir(work)
    for out in (".", str(tmp_path)):
        assert tiny_build(out, 0, "--force") == 2
        assert error_line(capsys) == (f"error: --output_dir {out} is the current directory or "
                                      "holds it; choose a new directory")
    assert os.listdir(work) == ["notes.txt"]


def test_checkpoint_dir_source_is_refused(tmp_path, capsys):
    assert build.main([*TINY, "--backend", "tensorrt_llm", "--checkpoint_only",
                       "--output_dir", str(tmp_path / "ck")]) == 0
    rc = build.main(["--ckpt_dir", str(tmp_path / "ck"), "--dtype", "float32",
                     "--output_dir", str(tmp_path / "ck")])
    assert rc == 2
    assert "is the source" in error_line(capsys)
    assert os.path.isfile(tmp_path / "ck" / "rank0.safetensors")


def test_trtllm_ckpt_sibling_is_checked(tmp_path, capsys):
    notes = user_dir(tmp_path / "eng_ckpt")
    rc = build.main([*TINY, "--backend", "tensorrt_llm", "--output_dir", str(tmp_path / "eng")])
    assert rc == 2
    assert error_line(capsys) == (
        f"error: --output_dir (its _ckpt sibling) {notes} exists and holds no engine or "
        "checkpoint written by this project; choose a new directory or pass --force to replace it")
    assert os.listdir(notes) == ["notes.txt"] and not (tmp_path / "eng").exists()


def test_convert_refuses_user_dir_and_source(tiny_hf_factory, tmp_path, capsys):
    notes = user_dir(tmp_path / "notes")
    assert hf_llama_convert.main(["-i", "tiny", "-o", str(notes), "--device", "cpu"]) == 2
    assert error_line(capsys).startswith(f"error: -o {notes} exists and holds no engine")
    src = tiny_hf_factory(2, False)
    before = sorted(os.listdir(src))
    capsys.readouterr()
    assert hf_llama_convert.main(["-i", str(src), "-o", str(src), "--force"]) == 2
    assert error_line(capsys) == (f"error: -o {src} is the source {src} or holds it; choose a "
                                  "new directory")
    assert sorted(os.listdir(src)) == before and os.listdir(notes) == ["notes.txt"]


def test_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "f"
    f.write_text("x")
    assert tiny_build(f, 0, "--force") == 2
    assert error_line(capsys) == f"error: --output_dir {f} exists and is not a directory"
    assert f.read_text() == "x"


# -- recovery of every intermediate state ------------------------------------------------------
def _stage(src: Path, parent: Path, kind: str, wid="0123456789ab", name="e") -> Path:
    dst = parent / f".{kind}-{name}-{wid}"
    dst.mkdir()
    for f in os.listdir(src):
        (dst / f).write_bytes((src / f).read_bytes())
    return dst


@pytest.fixture()
def pair(tmp_path):
    assert tiny_build(tmp_path / "a", 0) == 0 and tiny_build(tmp_path / "b", 1) == 0
    return tmp_path / "a", tmp_path / "b"


def test_recover_restores_a_parked_engine(pair, tmp_path):
    old, _ = pair
    _stage(old, tmp_path, "old")
    notes = outdir.recover(str(tmp_path / "e"))
    assert len(notes) == 1 and notes[0].startswith("restored")
    assert weights(tmp_path / "e") == weights(old) and leftovers(tmp_path) == []


def test_recover_moves_a_complete_output_in(pair, tmp_path):
    old, new = pair
    _stage(old, tmp_path, "old")
    _stage(new, tmp_path, "ready")
    outdir.recover(str(tmp_path / "e"))
    assert weights(tmp_path / "e") == weights(new) and leftovers(tmp_path) == []


def test_recover_removes_dead_staging_and_reports_its_size(pair, tmp_path):
    tmp = _stage(pair[0], tmp_path, "tmp")
    (tmp / outdir.STAGING_MARKER).write_text('{"pid": 999999999}')
    notes = outdir.recover(str(tmp_path / "e"))
    assert len(notes) == 1 and notes[0].startswith(f"removed {tmp} (") and "KB)" in notes[0]
    assert leftovers(tmp_path) == []


def test_recover_leaves_a_live_writer_and_unmarked_dirs(pair, tmp_path):
    live = _stage(pair[0], tmp_path, "tmp", "aaaaaaaaaaaa")
    (live / outdir.STAGING_MARKER).write_text(f'{{"pid": {os.getppid()}}}')
    user = _stage(pair[0], tmp_path, "tmp", "bbbbbbbbbbbb")  # no marker: not provably ours
    notes = outdir.recover(str(tmp_path / "e"))
    assert "left alone" in notes[0] and "left alone" in notes[1]
    assert live.is_dir() and user.is_dir()


# -- real builds killed ------------------------------------------------------------------------
# The child builds the tiny preset into OUT. "stall": after the weights are written into the
# staging dir it prints STAGED and waits to be killed. "renameN:SIG": right after the N-th
# rename of the swap it sends itself SIG.
CHILD = r"""
import os, signal, sys, time
import build
from llama_engine import checkpoint
mode, out, seed = sys.argv[1], sys.argv[2], sys.argv[3]
if mode == "stall":
    save = checkpoint.save_tensors
    def stalled(*a, **k):
        save(*a, **k)
        print("STAGED", flush=True)
        time.sleep(120)
    checkpoint.save_tensors = stalled
else:
    n, sig = int(mode[6:].split(":")[0]), getattr(signal, mode.split(":")[1])
    rename, count = os.rename, [0]
    def counting(a, b):
        rename(a, b)
        if os.path.basename(os.path.dirname(os.path.abspath(b))) == os.path.basename(
                os.path.dirname(os.path.abspath(out))):
            count[0] += 1
            if count[0] == n:
                os.kill(os.getpid(), sig)
    os.rename = counting
sys.exit(build.main(["--model_config", "tiny", "--dtype", "float32", "--max_input_len", "16",
                     "--max_output_len", "8", "--seed", seed, "--output_dir", out]))
"""


def run_child(mode: str, out: Path, seed: int, kill_with=None) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, "-c", CHILD, mode, str(out), str(seed)], cwd=REPO,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if mode == "stall":
        deadline = time.time() + 60
        line = p.stdout.readline()
        assert line.strip() == "STAGED" and time.time() < deadline, p.stderr.read()
        staged = [d for d in leftovers(out.parent) if d.startswith(".tmp-")]
        assert len(staged) == 1  # the full-size staging dir exists at the kill
        p.send_signal(kill_with)
    return p.wait(timeout=60)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT],
                         ids=["KILL", "TERM", "INT"])
def test_killed_while_writing(tmp_path, engines, sig, capsys):
    out = tmp_path / "e"
    assert tiny_build(out, 0) == 0
    rc = run_child("stall", out, 1, sig)
    assert rc != 0
    assert weights(out) == engines["old"]  # the old engine intact
    left = leftovers(tmp_path)
    # Python sees TERM and INT: it removes its staging dir. KILL leaves it for the next build.
    assert left == [] if sig != signal.SIGKILL else (len(left) == 1 and left[0].startswith(".tmp-"))
    capsys.readouterr()
    assert tiny_build(out, 1) == 0
    err = capsys.readouterr().err
    if sig == signal.SIGKILL:
        assert f"note: removed {tmp_path / left[0]} (" in err
    assert weights(out) == engines["new"] and leftovers(tmp_path) == []


@pytest.mark.parametrize("n", [1, 2, 3])
def test_killed_between_renames(tmp_path, engines, n):
    """SIGKILL after each rename of the swap: the target holds the old engine or nothing;
    the next build's recovery always ends with a complete engine and no leftovers."""
    out = tmp_path / "e"
    assert tiny_build(out, 0) == 0
    assert run_child(f"rename{n}:SIGKILL", out, 1) == -signal.SIGKILL
    if out.exists():
        assert weights(out) in (engines["old"], engines["new"])
    assert leftovers(tmp_path)  # something for recovery to find
    outdir.recover(str(out))
    assert weights(out) == engines["new"] and leftovers(tmp_path) == []  # the finished one
    assert tiny_build(out, 0) == 0 and weights(out) == engines["old"]


def test_sigterm_during_the_swap_waits_for_it(tmp_path, engines):
    out = tmp_path / "e"
    assert tiny_build(out, 0) == 0
    assert run_child("rename1:SIGTERM", out, 1) == 128 + signal.SIGTERM
    assert weights(out) == engines["new"] and leftovers(tmp_path) == []


def test_killed_first_build_is_recovered(tmp_path, engines):
    out = tmp_path / "e"
    assert run_child("rename1:SIGKILL", out, 1) == -signal.SIGKILL
    assert not out.exists()
    assert tiny_build(out, 0) == 0  # the next build: the ready one moves in, then is replaced
    assert weights(out) == engines["old"] and leftovers(tmp_path) == []
