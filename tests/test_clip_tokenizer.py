"""layerdiff.model.clip_tokenizer: the SD1.5 CLIP tokenizer built offline, and where it is looked for."""

import shutil

import pytest

from layerdiff.errors import LayerDiffError
from layerdiff.model import clip_tokenizer as ct


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No test reads the user's cache or environment."""
    monkeypatch.setenv(ct.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.delenv(ct.ENV_TOKENIZER, raising=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """vocab.json + merges.txt built once from open_clip's BPE file."""
    bpe = ct.open_clip_bpe_path()
    if bpe is None:
        pytest.skip("needs the BPE file: pip install --no-deps open_clip_torch")
    return ct.build_tokenizer_files(bpe, tmp_path_factory.mktemp("built"))


def _copy(src, dst):
    dst.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(src / name, dst / name)
    return dst


def test_sd15_token_ids_and_padding(built):
    tok = ct.load_clip_tokenizer(built)
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = tok(
        "a photo of a cat", padding="max_length", truncation=True, max_length=tok.model_max_length
    ).input_ids
    assert len(padded) == 77 and padded[7:] == [49407] * 70  # SD1.5 pads with <|endoftext|>
    assert len(tok(" ".join(["cat"] * 100), truncation=True, max_length=77).input_ids) == 77


def test_builds_and_caches_from_open_clip(built, tmp_path):
    folder = ct.find_clip_tokenizer_files()
    assert folder == tmp_path / "cache" / "clip_tokenizer"
    for name in ("vocab.json", "merges.txt"):
        assert (folder / name).read_bytes() == (built / name).read_bytes()
    assert sorted(p.name for p in folder.iterdir()) == ["merges.txt", "vocab.json"]  # no temp files


def test_search_order(built, tmp_path, monkeypatch):
    explicit, env, comfy, cached = (
        _copy(built, tmp_path / n) for n in ("explicit", "env", "comfy", "cache/clip_tokenizer")
    )
    diffusers_dir = tmp_path / "sd15"
    _copy(built, diffusers_dir / "tokenizer")
    monkeypatch.setenv(ct.ENV_TOKENIZER, str(env))
    assert ct.find_clip_tokenizer_files(explicit, search_dirs=[comfy]) == explicit
    assert ct.find_clip_tokenizer_files(search_dirs=[comfy]) == env
    monkeypatch.delenv(ct.ENV_TOKENIZER)
    assert ct.find_clip_tokenizer_files(search_dirs=[tmp_path / "missing", comfy]) == comfy
    assert ct.find_clip_tokenizer_files(search_dirs=[diffusers_dir]) == diffusers_dir / "tokenizer"
    assert ct.find_clip_tokenizer_files() == cached


def test_bad_explicit_folders_fail_instead_of_falling_through(built, tmp_path, monkeypatch):
    with pytest.raises(LayerDiffError, match="has no vocab.json and merges.txt"):
        ct.find_clip_tokenizer_files(tmp_path)
    monkeypatch.setenv(ct.ENV_TOKENIZER, str(tmp_path / "nope"))
    with pytest.raises(LayerDiffError, match="LAYERDIFF_CLIP_TOKENIZER=.* has no vocab.json"):
        ct.find_clip_tokenizer_files()


def test_nothing_found_gives_the_install_line(monkeypatch):
    monkeypatch.setattr(ct, "open_clip_bpe_path", lambda: None)
    with pytest.raises(
        LayerDiffError, match=r"pip install --no-deps open_clip_torch.*LAYERDIFF_CLIP_TOKENIZER"
    ):
        ct.load_clip_tokenizer()
