"""The `murmur` command line: help, every kind of bad input, key files, config files, plot."""

import json
import os
import stat
import subprocess
import sys

import pytest

from gossip.identity import Identity, format_peer_id, load_swarm_secret
from node.cli import build_parser, config_from_args, main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {err!r}"
    assert lines[0].startswith("murmur: error: ")
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("argv, words", [
    ([], ["keygen", "swarm-key", "join", "local", "status", "plot"]),
    (["join"], ["--bootstrap", "--listen", "--swarm-key", "--algorithm", "--checkpoint-dir", "--metrics", "--config", "--sync-every"]),
    (["local"], ["--nodes", "--summary", "--steps", "--algorithm"]),
    (["keygen"], ["--out"]),
    (["plot"], ["-o"]),
    (["status"], ["HOST:PORT", "--swarm-key"]),
])
def test_help(capsys, argv, words):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for w in words:
        assert w in out


def test_keygen_writes_a_private_key_and_refuses_to_overwrite(capsys, tmp_path):
    path = tmp_path / "id.key"
    code, out, err = run_main(capsys, "keygen", "--out", str(path))
    assert code == 0 and err == ""
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert out.strip() == format_peer_id(Identity.load(path).peer_id)
    assert len(out.strip()) == 52 and out.strip() == out.strip().lower()
    before = path.read_bytes()
    code, out, err = run_main(capsys, "keygen", "--out", str(path))
    assert code == 1 and out == ""
    assert "already exists; refusing to overwrite" in one_line_error(err)
    assert path.read_bytes() == before


def test_swarm_key_file(capsys, tmp_path):
    path = tmp_path / "swarm.key"
    code, out, err = run_main(capsys, "swarm-key", "--out", str(path))
    assert code == 0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(load_swarm_secret(path)) == 32
    code, _, err = run_main(capsys, "swarm-key", "--out", str(path))
    assert code == 1 and "already exists" in one_line_error(err)


@pytest.mark.parametrize("argv, code, fragment", [
    (["join", "--bogus"], 2, "unrecognized arguments: --bogus"),
    (["join", "--steps", "many"], 2, "invalid int value: 'many'"),
    (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
    (["keygen"], 2, "the following arguments are required: --out"),
    (["join", "--steps", "5"], 1, "needs --checkpoint-dir"),
    (["join", "--checkpoint-dir", "{tmp}/c", "--bootstrap", "nonsense"], 1, "malformed address 'nonsense'"),
    (["join", "--checkpoint-dir", "{tmp}/c", "--bootstrap", "host:99999"], 1, "bad port"),
    (["join", "--checkpoint-dir", "{tmp}/c", "--listen", "[::1:80"], 1, "malformed address"),
    (["join", "--checkpoint-dir", "{tmp}/c", "--algorithm", "sgd"], 1, "algorithm must be one of noloco, diloco, streaming-diloco"),
    (["join", "--checkpoint-dir", "{tmp}/c", "--steps", "0"], 1, "steps must be an integer >= 1"),
    (["join", "--checkpoint-dir", "{tmp}/c", "--d-model", "30"], 1, "must be a multiple of n-head"),
    (["join", "--checkpoint-dir", "{tmp}/c", "--config", "{tmp}/missing.toml"], 1, "missing.toml' does not exist"),
    (["join", "--checkpoint-dir", "{tmp}/c", "--identity", "{tmp}/missing.key"], 1, "missing.key: no such file"),
    (["join", "--checkpoint-dir", "{tmp}/c", "--swarm-key", "{tmp}/missing.swarm"], 1, "missing.swarm: no such file"),
    (["join", "--checkpoint-dir", "{tmp}/c", "--data", "{tmp}/missing.txt"], 1, "does not exist"),
    (["join", "--checkpoint-dir", "{tmp}/c", "--algorithm", "streaming-diloco", "--n-layer", "2"], 1, "use at most 3 fragments"),
    (["local", "--algorithm", "streaming-diloco", "--sync-every", "30"], 1, "fragments (4) must divide sync_every (30)"),
    (["local", "--nodes", "0"], 1, "--nodes must be between 1 and 64"),
    (["plot", "{tmp}/missing.jsonl", "-o", "{tmp}/x.png"], 1, "does not exist"),
    (["status", "localhost"], 1, "malformed address 'localhost'"),
])
def test_bad_input_is_one_line_and_nonzero(capsys, tmp_path, argv, code, fragment):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    got, out, err = run_main(capsys, *argv)
    assert got == code
    assert fragment in one_line_error(err)


def test_malformed_key_files_are_one_line_errors(capsys, tmp_path):
    (tmp_path / "bad.key").write_text("not a key")
    (tmp_path / "bad.swarm").write_text("murmur-swarm-secret-v1:zz")
    for flag, name in (("--identity", "bad.key"), ("--swarm-key", "bad.swarm")):
        code, _, err = run_main(capsys, "join", "--checkpoint-dir", str(tmp_path / "c"), flag, str(tmp_path / name))
        assert code == 1 and name in one_line_error(err)


def test_toml_config_merges_under_flags(tmp_path):
    cfg_file = tmp_path / "node.toml"
    cfg_file.write_text('algorithm = "diloco"\nsync-every = 20\nbootstrap = "127.0.0.1:7000"\nsteps = 100\nquiet = true\n')
    args = build_parser().parse_args(["join", "--config", str(cfg_file), "--steps", "7", "--checkpoint-dir", "d"])
    cfg = config_from_args(args)
    assert (cfg.algorithm, cfg.sync_every, cfg.bootstrap, cfg.steps, cfg.quiet) == ("diloco", 20, ("127.0.0.1:7000",), 7, True)
    assert cfg.checkpoint_dir == "d"
    assert cfg.algorithm_options() == {"sync_every": 20, "timeout": 30.0}


@pytest.mark.parametrize("text, fragment", [
    ("bogus = 1\n", "unknown key 'bogus'"),
    ("steps = 'ten'\n", "steps must be an integer"),
    ("steps = [\n", "cannot be read"),
    ("bootstrap = [1, 2]\n", "bootstrap must be a string or a list of strings"),
])
def test_bad_toml_is_one_line(capsys, tmp_path, text, fragment):
    (tmp_path / "c.toml").write_text(text)
    code, _, err = run_main(capsys, "join", "--checkpoint-dir", str(tmp_path), "--config", str(tmp_path / "c.toml"))
    assert code == 1 and fragment in one_line_error(err)


def test_repeatable_and_multi_value_addresses():
    args = build_parser().parse_args(["join", "--bootstrap", "a:1", "b:2", "--bootstrap", "[::1]:3", "--listen", "0.0.0.0:7447"])
    cfg = config_from_args(args, checkpoint_dir="x")
    assert cfg.bootstrap == ("a:1", "b:2", "[::1]:3") and cfg.listen == ("0.0.0.0:7447",)


def _metrics_file(path, node_id, evals):
    recs = [{"event": "start", "t": 100.0, "id": node_id, "step": 0}]
    for i, (step, bpb) in enumerate(evals):
        recs.append({"event": "eval", "t": 100.0 + i, "step": step, "eval_bpb": bpb, "bytes_sent": 1000 * i, "bytes_received": 900 * i})
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n{\"torn")
    return path


def test_plot_writes_a_png(capsys, tmp_path):
    a = _metrics_file(tmp_path / "a.jsonl", "aaaa", [(0, 8.0), (10, 6.0), (20, 5.0)])
    b = _metrics_file(tmp_path / "b.jsonl", "bbbb", [(0, 8.0), (10, 6.5)])
    code, out, err = run_main(capsys, "plot", str(a), str(b), "-o", str(tmp_path / "out.png"))
    assert code == 0, err
    assert out.strip() == f"wrote {tmp_path / 'out.png'} (2 nodes)"
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_install(capsys, tmp_path, monkeypatch):
    a = _metrics_file(tmp_path / "a.jsonl", "aaaa", [(0, 8.0)])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    code, _, err = run_main(capsys, "plot", str(a), "-o", str(tmp_path / "out.png"))
    assert code == 1
    assert one_line_error(err) == "murmur: error: plotting needs matplotlib: pip install 'murmur[plot]'"


def test_real_process_bad_flag_prints_one_line_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "node", "join", "--nope"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip() == "murmur: error: unrecognized arguments: --nope (see `murmur join --help`)"
