"""Checkpoints from URLs (common.fetch_checkpoint): downloaded once, verified, never used half-written."""

import functools
import hashlib
import http.server
import socket
import threading

import pytest
import torch
from conftest import run_script

import common


def saved_model(folder, name_stem="resnet8"):
    """A resnet8 checkpoint saved under torchvision's name-<sha256 prefix>.pth convention."""
    folder.mkdir(parents=True, exist_ok=True)
    scratch = folder / "scratch.pth"
    torch.save({"model": common.build_model("resnet8", 100).state_dict(), "arch": "resnet8"}, scratch)
    digest = hashlib.sha256(scratch.read_bytes()).hexdigest()
    path = folder / f"{name_stem}-{digest[:8]}.pth"
    scratch.rename(path)
    return path, digest


def test_a_file_url_is_downloaded_once_verified_by_its_name_and_loaded_safely(tmp_path, capsys):
    source, _ = saved_model(tmp_path / "server")
    local = common.fetch_checkpoint(source.as_uri(), tmp_path / "ckpt")
    assert local == tmp_path / "ckpt" / "downloads" / source.name and local.read_bytes() == source.read_bytes()
    assert "downloading" in capsys.readouterr().out
    assert common.fetch_checkpoint(source.as_uri(), tmp_path / "ckpt") == local
    assert "downloading" not in capsys.readouterr().out  # reused, not downloaded again
    model = common.load_model_file("resnet8", 100, local)
    assert torch.equal(model.state_dict()["fc.weight"], torch.load(source, weights_only=True)["model"]["fc.weight"])


def test_a_checksum_mismatch_is_one_error_and_leaves_no_file(tmp_path):
    source, digest = saved_model(tmp_path / "server", "teacher")
    wrong = "0" * 64
    with pytest.raises(common.ConfigError, match="does not match its expected sha256"):
        common.fetch_checkpoint(f"{source.as_uri()}#sha256={wrong}", tmp_path / "ckpt")
    assert list((tmp_path / "ckpt" / "downloads").iterdir()) == []  # neither the file nor a partial one
    right = common.fetch_checkpoint(f"{source.as_uri()}#sha256={digest}", tmp_path / "ckpt")
    assert right.read_bytes() == source.read_bytes()
    right.write_bytes(b"corrupted since")  # a damaged earlier download is fetched again, not used
    assert common.fetch_checkpoint(f"{source.as_uri()}#sha256={digest}", tmp_path / "ckpt").read_bytes() == (
        source.read_bytes()
    )


def test_teacher_sha256_checks_a_url_and_a_local_file_and_needs_a_teacher_path(tmp_path, cifar_dir):
    source, digest = saved_model(tmp_path / "server", "teacher")
    with pytest.raises(common.ConfigError, match="does not match its expected sha256"):
        common.fetch_checkpoint(source.as_uri(), tmp_path / "ckpt", sha256="1" * 16)  # overrides the name's
    assert list((tmp_path / "ckpt" / "downloads").iterdir()) == []
    assert common.fetch_checkpoint(source, tmp_path / "ckpt", sha256=digest[:12].upper()) == source
    with pytest.raises(common.ConfigError, match="does not start with the --teacher-sha256 0000000000"):
        common.fetch_checkpoint(source, tmp_path / "ckpt", sha256="0" * 10)
    flags = ["--dataset", "cifar100", "--data-dir", cifar_dir, "--teacher", "resnet8", "--student", "resnet8"]
    alone = run_script("kd.py", *flags, "--teacher-sha256", digest, cwd=tmp_path)
    assert alone.returncode == 2 and "--teacher-sha256 checks the file of --teacher-path: give that too" in alone.stderr
    wrong = run_script("kd.py", *flags, "--teacher-path", source, "--teacher-sha256", "f" * 8, cwd=tmp_path)
    assert wrong.returncode != 0 and "not the file you meant" in wrong.stderr
    assert not list((tmp_path / "runs").glob("*/last.pth"))  # stopped before any training


def test_an_interrupted_download_is_never_used(tmp_path, monkeypatch):
    source, _ = saved_model(tmp_path / "server")
    real_urlopen = torch.hub.urlopen

    class Cut:
        def __init__(self, response):
            self.response, self.sent = response, 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.response.close()

        def info(self):
            return self.response.info()

        def read(self, size):
            if self.sent > 1000:
                raise ConnectionResetError("connection cut")
            self.sent += size
            return self.response.read(size)

    monkeypatch.setattr(torch.hub, "urlopen", lambda request: Cut(real_urlopen(request)))
    with pytest.raises(common.ConfigError, match="connection cut"):
        common.fetch_checkpoint(source.as_uri(), tmp_path / "ckpt")
    assert list((tmp_path / "ckpt" / "downloads").iterdir()) == []
    monkeypatch.setattr(torch.hub, "urlopen", real_urlopen)
    assert common.fetch_checkpoint(source.as_uri(), tmp_path / "ckpt").read_bytes() == source.read_bytes()


def test_offline_says_which_file_to_place_where(tmp_path):
    with socket.socket() as probe:  # a port on this machine with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(common.ConfigError) as error:
        common.fetch_checkpoint(f"http://127.0.0.1:{port}/resnet34-b627a593.pth", tmp_path / "ckpt")
    assert "could not download" in str(error.value)
    assert str(tmp_path / "ckpt" / "downloads" / "resnet34-b627a593.pth") in str(error.value)


def test_a_served_teacher_trains_a_student_and_short_names_resolve(tmp_path, cifar_dir):
    source, _ = saved_model(tmp_path / "server")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(source.parent))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{source.name}"
        flags = ["--data-dir", cifar_dir, "--teacher", "resnet8", "--student", "resnet8", "--teacher-path", url]
        result = run_script("kd.py", *flags, "--epochs", "1", "--train-subset", "32", cwd=tmp_path)
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "checkpoints" / "cifar100" / "downloads" / source.name).read_bytes() == source.read_bytes()
    assert f"teacher resnet8 from checkpoints/cifar100/downloads/{source.name}" in result.stdout
    assert common.KNOWN_CHECKPOINTS["torchvision:resnet34"].endswith("/resnet34-b627a593.pth")
    assert common.expected_sha256(common.KNOWN_CHECKPOINTS["torchvision:resnet34"], "resnet34-b627a593.pth") == (
        "b627a593"
    )
    assert common.fetch_checkpoint("some/local.pth", tmp_path) == common.Path("some/local.pth")
