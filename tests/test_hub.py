"""Local-first file resolution against a Hugging Face cache built in tmp_path; no network."""

from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
from huggingface_hub import errors as hf_errors

from mistralrs_cli import hub
from mistralrs_cli.errors import UserError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """HF_HOME=tmp with org/name cached (config.json, tokenizer.json), offline, no tokens in env."""
    home = tmp_path / "hf"
    repo = home / "hub" / "models--org--name"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    (snapshot / "config.json").write_text('{"model_type": "llama"}')
    (snapshot / "tokenizer.json").write_text("{}")
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
                "HF_TOKEN_PATH", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return SimpleNamespace(home=home, snapshot=snapshot)


# ---- resolve_token ---------------------------------------------------------------------------

def test_token_sources(hf_cache, monkeypatch, tmp_path):
    assert hub.resolve_token("none") is None
    assert hub.resolve_token("literal:hf_abc") == "hf_abc"
    assert hub.resolve_token("cache") is None  # no stored token yet
    (hf_cache.home / "token").write_text("hf_stored\n")
    assert hub.resolve_token("cache") == "hf_stored"
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "elsewhere"))
    (tmp_path / "elsewhere").write_text("hf_elsewhere")
    assert hub.resolve_token("cache") == "hf_elsewhere"

    assert hub.resolve_token("env") is None
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "hf_legacy")
    assert hub.resolve_token("env") == "hf_legacy"
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    assert hub.resolve_token("env") == "hf_env"
    monkeypatch.setenv("MY_TOKEN", " hf_mine ")
    assert hub.resolve_token("env:MY_TOKEN") == "hf_mine"
    assert hub.resolve_token("env:UNSET_VAR_FOR_TEST") is None

    (tmp_path / "tok.txt").write_text("  hf_file\n")
    assert hub.resolve_token(f"path:{tmp_path / 'tok.txt'}") == "hf_file"


def test_token_source_errors(hf_cache):
    with pytest.raises(UserError, match=r"--token-source path:nope.txt .*does not exist"):
        hub.resolve_token("path:nope.txt")
    for bad in ("token", "literal:", "file:x", "ENV"):
        with pytest.raises(UserError, match=r"--token-source .* literal:TOKEN, env:VAR.*cache or none"):
            hub.resolve_token(bad)


# ---- resolve_file ----------------------------------------------------------------------------

def test_cached_file_resolves_to_snapshot(hf_cache):
    path = hub.resolve_file("org/name", "config.json")
    assert path == hf_cache.snapshot / "config.json"
    assert path.read_text() == '{"model_type": "llama"}'


def test_hf_home_is_read_at_call_time(hf_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    with pytest.raises(UserError, match="not in the Hugging Face cache"):
        hub.resolve_file("org/name", "config.json")
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache.home / "hub"))
    assert hub.resolve_file("org/name", "config.json") == hf_cache.snapshot / "config.json"


def test_absent_repo_offline_says_so(hf_cache):
    with pytest.raises(UserError) as e:
        hub.resolve_file("other/model", "model.gguf")
    message = str(e.value)
    assert "model.gguf from other/model" in message and "HF_HUB_OFFLINE=1" in message
    assert "pass a local path" in message and str(hf_cache.home / "hub") in message
    assert "\n" not in message


def test_optional_missing_file_is_none(hf_cache):
    assert hub.resolve_file("org/name", "generation_config.json", required=False) is None
    assert hub.resolve_file("other/model", "tokenizer_config.json", required=False) is None
    with pytest.raises(UserError, match="generation_config.json from org/name"):
        hub.resolve_file("org/name", "generation_config.json")


def test_local_paths_win(hf_cache, tmp_path):
    model_dir = tmp_path / "org" / "name"  # same spelling as the cached repo id
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text("{}")
    assert hub.resolve_file("org/name", "config.json") == Path("org/name/config.json")
    assert hub.resolve_file(str(model_dir), "config.json") == model_dir / "config.json"
    assert hub.resolve_file(str(model_dir), "tokenizer.json", required=False) is None
    with pytest.raises(UserError, match=rf"tokenizer.json is not in the model directory {model_dir}"):
        hub.resolve_file(str(model_dir), "tokenizer.json")

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    assert hub.resolve_file(None, str(gguf)) == gguf
    assert hub.resolve_file("org/name", str(gguf)) == gguf  # explicit path beats the repo
    assert hub.resolve_file(None, "model.gguf") == Path("model.gguf")


def test_bare_name_in_cwd_does_not_shadow_the_repo(hf_cache, tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"stray": true}')
    assert hub.resolve_file("org/name", "tokenizer.json") == hf_cache.snapshot / "tokenizer.json"


def test_missing_local_paths(hf_cache):
    with pytest.raises(UserError, match=r"missing.gguf does not exist; .*--model-id"):
        hub.resolve_file(None, "missing.gguf")
    with pytest.raises(UserError, match=r"-m ./models/llama: no such local directory"):
        hub.resolve_file("./models/llama", "config.json", flag="-m")
    Path("weights.bin").write_text("x")
    with pytest.raises(UserError, match="is a file, not a directory"):
        hub.resolve_file("weights.bin", "config.json")


def fake_response(status):
    return SimpleNamespace(status_code=status, headers={}, request=None)


@pytest.mark.parametrize("source,token,shown", [
    ("literal:hf_secret", "hf_secret", "--token-source literal:… (token refused)"),
    ("env:MY_TOKEN", "hf_mine", "--token-source env:MY_TOKEN (token refused)"),
    ("none", False, "--token-source none (no token found)"),
    ("cache", False, "--token-source cache (no token found)"),
])
def test_gated_repo_names_the_token_source(hf_cache, monkeypatch, source, token, shown):
    monkeypatch.setenv("MY_TOKEN", "hf_mine")
    monkeypatch.setenv("HF_TOKEN", "hf_not_chosen")  # must not leak into a `cache`/`none` lookup
    seen = {}

    def gated(repo_id, filename, **kwargs):
        seen.update(kwargs)
        raise hf_errors.GatedRepoError("401 Client Error: gated", response=fake_response(401))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    with pytest.raises(UserError) as e:
        hub.resolve_file("meta-llama/Llama-3-8B", "config.json", source)
    assert seen["token"] == token
    assert seen["cache_dir"] == hf_cache.home / "hub" and seen["local_files_only"] is True
    message = str(e.value)
    assert "meta-llama/Llama-3-8B is a gated model" in message and shown in message
    assert "--token-source env:HF_TOKEN" in message and "hf_secret" not in message


def test_private_or_missing_repo(hf_cache, monkeypatch):
    def not_found(status):
        def download(repo_id, filename, **kwargs):
            raise hf_errors.RepositoryNotFoundError("Repository Not Found", response=fake_response(status))
        return download

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", not_found(401))
    with pytest.raises(UserError, match=r"or it is private and --token-source cache \(no token found\)"):
        hub.resolve_file("org/private", "config.json", required=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", not_found(404))
    with pytest.raises(UserError, match=r"^Model org/typo was not found on the Hugging Face Hub; check -m\.$"):
        hub.resolve_file("org/typo", "config.json", flag="-m")


def test_remote_file_missing_and_http_errors(hf_cache, monkeypatch):
    def raising(exc):
        def download(repo_id, filename, **kwargs):
            raise exc
        return download

    missing = hf_errors.RemoteEntryNotFoundError("404", response=fake_response(404))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", raising(missing))
    with pytest.raises(UserError, match="File x.gguf was not found in model repository org/name"):
        hub.resolve_file("org/name", "x.gguf")
    assert hub.resolve_file("org/name", "x.gguf", required=False) is None

    forbidden = hf_errors.HfHubHTTPError("403 Forbidden", response=fake_response(403))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", raising(forbidden))
    with pytest.raises(UserError, match=r"refused access .*\(403\) and --token-source cache"):
        hub.resolve_file("org/name", "x.gguf")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", raising(ConnectionError("down")))
    with pytest.raises(UserError, match="Could not reach the Hugging Face Hub"):
        hub.resolve_file("org/name", "x.gguf")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", raising(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # bugs keep their traceback
        hub.resolve_file("org/name", "x.gguf")


def test_no_network_online_mode(hf_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    lost = hf_errors.LocalEntryNotFoundError("An error happened while trying to locate the file")

    def download(repo_id, filename, **kwargs):
        assert kwargs["local_files_only"] is False
        raise lost

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    with pytest.raises(UserError, match=r"Could not reach .* check the network connection"):
        hub.resolve_file("org/name", "model.safetensors")


def test_invalid_repo_id(hf_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(UserError, match=r"--model-id 'bad id!' is neither an existing local directory"):
        hub.resolve_file("bad id!", "config.json")


# ---- resolve_model_dir -----------------------------------------------------------------------

def test_model_dir(hf_cache, tmp_path):
    assert hub.resolve_model_dir("org/name") == hf_cache.snapshot
    assert hub.resolve_model_dir(str(tmp_path)) == tmp_path
    with pytest.raises(UserError, match="the files of other/model is not in the Hugging Face cache"):
        hub.resolve_model_dir("other/model", allow_patterns=["*.json"])


def test_model_dir_passes_resolved_token(hf_cache, monkeypatch):
    seen = {}

    def snapshot(repo_id, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        return str(hf_cache.snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    assert hub.resolve_model_dir("org/name", "literal:hf_x", ["*.json"]) == hf_cache.snapshot
    assert seen == {"repo_id": "org/name", "token": "hf_x", "cache_dir": hf_cache.home / "hub",
                    "local_files_only": True, "allow_patterns": ["*.json"]}
