"""Words the model does not know: named from the model's own tokenizer, warned once per encode, on
the command line's stderr and in the nodes' output text (the built-in layerdiff-toy model)."""

from __future__ import annotations

import logging
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import nodes
from layerdiff.conditioning import VOCABULARY_HINT, LayerPrompts, encode_prompts, unknown_words_warning
from layerdiff.config import TOY_UNTRAINED_WORDS, TOY_WORDS, trained_words
from layerdiff.data.toy import sample_prompt_spec
from layerdiff.edit import style_layers
from layerdiff.io.checkpoint import builtin_names, load_model
from layerdiff.model import clip_tokenizer as ct
from layerdiff.model.text import unknown_words
from layerdiff.pipeline import generate
from layerdiff.settings import SamplerSettings

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif("layerdiff-toy" not in builtin_names(),
                                reason="the built-in layerdiff-toy weights are not installed")
SCENE = LayerPrompts("a red star in front of a brick wall", ("a brick wall", "a red star"))
FAST = {"steps": 2, "mask_guidance": 0.0, "layout_cleanup": 0.0}


@pytest.fixture(scope="module")
def toy():
    return load_model("layerdiff-toy")


@pytest.fixture(scope="module")
def stack(toy):
    return generate(toy, SCENE, SamplerSettings(empty_layer_retries=0, **FAST), seed=0)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "does not know" in r.getMessage()]


# ---------------------------------------------------------------------------- unknown_words
def test_words_outside_the_vocabulary_are_named_in_order_once(toy):
    assert unknown_words(toy.tokenizer, "a pink hexagon") == ["pink", "hexagon"]
    assert unknown_words(toy.tokenizer, "a cat on a sofa") == ["cat", "sofa"]
    assert unknown_words(toy.tokenizer, "a cat, a Cat and a CAT") == ["cat"]  # compared as the tokenizer does


def test_every_prompt_of_the_toy_world_is_known(toy):
    rng = np.random.default_rng(0)
    for _ in range(300):
        spec = sample_prompt_spec(rng)
        for text in (spec.global_prompt, *spec.layer_prompts):
            assert unknown_words(toy.tokenizer, text, trained_words(toy.config)) == [], text


def test_case_and_punctuation_follow_the_tokenizer(toy):
    tok = toy.tokenizer
    assert unknown_words(tok, "A LARGE Red Star, on the LEFT") == []  # the tokenizer lower-cases
    assert unknown_words(tok, "a PINK star") == ["PINK"]  # named as written
    assert unknown_words(tok, "a red star, a blue circle") == []  # "," is a word of the toy prompts
    assert unknown_words(tok, "a red star.") == ["."]  # "." is not: the model reads [UNK]
    assert unknown_words(tok, "a red star!!") == ["!!"]
    assert unknown_words(tok, "in the centre-ish") == ["-ish"]  # "centre" stays a known word
    assert unknown_words(tok, "don't") == ["don't"]  # touching unknown pieces are one word
    assert unknown_words(tok, "a red star\nand a  blue\tcircle") == []
    assert unknown_words(tok, "") == [] and unknown_words(tok, "   ") == []


def test_exactly_the_pieces_the_tokenizer_maps_to_its_unknown_id(toy):
    tok, unk = toy.tokenizer, toy.tokenizer.unk_token_id
    for text in ("a pink hexagon.", "a cat on a sofa, watercolor style", "Ein roter Stern!", "a red star"):
        pieces = unknown_words(tok, text)
        assert (unk in tok(text).input_ids) == bool(pieces), text
        for piece in pieces:
            assert set(tok(piece, add_special_tokens=False).input_ids) == {unk}, piece
            text = text.replace(piece, " ")
        assert unk not in tok(text).input_ids, text


def test_words_the_tokenizer_lists_but_training_never_used_are_named_too(toy):
    """"center" and "watercolor" have ids of their own, but no toy-world prompt uses them: the model
    learned nothing for them, so with the model's trained words they are named; the tokenizer alone
    does not flag them."""
    text = "a red star in the center, watercolor style"
    assert unknown_words(toy.tokenizer, text) == []
    assert unknown_words(toy.tokenizer, text, trained_words(toy.config)) == ["center", "watercolor", "style"]
    assert "center, watercolor, style" in unknown_words_warning(toy, LayerPrompts(text, ("a brick wall", text)))


def test_the_trained_words_are_exactly_those_of_the_toy_worlds_prompts(toy):
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(3000):
        spec = sample_prompt_spec(rng)
        for text in (spec.global_prompt, *spec.layer_prompts):
            seen |= set(toy.tokenizer.tokenize(text))
    assert seen == trained_words(toy.config)
    assert trained_words(toy.config) <= set(TOY_WORDS) and TOY_UNTRAINED_WORDS <= set(TOY_WORDS)


def test_a_tokenizer_without_offsets_names_whole_words(toy):
    class SlowLike:  # a Python tokenizer: no offset mapping
        unk_token_id, all_special_tokens = toy.tokenizer.unk_token_id, toy.tokenizer.all_special_tokens

        def __call__(self, text, return_offsets_mapping=False, **kwargs):
            if return_offsets_mapping:
                raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")
            return toy.tokenizer(text, **kwargs)

        def __getattr__(self, name):
            return getattr(toy.tokenizer, name)

    assert unknown_words(SlowLike(), "a Pink hexagon on the left.") == ["Pink", "hexagon", "left."]  # whole words


def test_the_sd15_clip_bpe_tokenizer_knows_every_word(tmp_path):
    bpe = ct.open_clip_bpe_path()
    if bpe is None:
        pytest.skip("needs the BPE file: pip install --no-deps open_clip_torch")
    clip = ct.load_clip_tokenizer(ct.build_tokenizer_files(bpe, tmp_path))
    for text in ("a pink hexagon", "a cat on a sofa, watercolor style.", "zzqxj ünïcødé 🐱 don't", "<|endoftext|>"):
        assert unknown_words(clip, text) == [], text
    model = types.SimpleNamespace(tokenizer=clip)
    assert unknown_words_warning(model, LayerPrompts("a cat on a sofa", ("a sofa", "a cat"), "blurry")) == ""


# ---------------------------------------------------------------------------- the warning
def test_one_warning_line_names_the_words_and_the_prompts(toy, caplog):
    prompts = LayerPrompts("a pink hexagon in front of a brick wall", ("a brick wall", "a red star", "a pink hexagon"),
                           "blurry")
    with caplog.at_level(logging.WARNING, logger="layerdiff"):
        encode_prompts(toy, prompts)
    (line,) = _warnings(caplog)
    assert line == ("words the model does not know (not in its training prompts; they steer nothing): pink, hexagon (global prompt, layer 2 prompt); "
                    f'blurry (negative prompt "blurry"); {VOCABULARY_HINT}')
    assert "\n" not in line


def test_a_single_prompt_is_quoted_on_one_line(toy):
    prompts = LayerPrompts("a red star", ("a brick wall\nwith moss", "a red star"))
    assert unknown_words_warning(toy, prompts) == (
        f'words the model does not know (not in its training prompts; they steer nothing): with, moss (background prompt "a brick wall with moss"); '
        f"{VOCABULARY_HINT}"
    )


def test_known_prompts_warn_nothing(toy, caplog):
    with caplog.at_level(logging.WARNING, logger="layerdiff"):
        encode_prompts(toy, SCENE)
    assert _warnings(caplog) == [] and unknown_words_warning(toy, SCENE) == ""


def test_a_style_pass_warns_once_about_its_phrase(toy, stack, caplog):
    with caplog.at_level(logging.WARNING, logger="layerdiff"):
        style_layers(toy, stack, "cat style", 0.3, None, seed=1, settings=SamplerSettings(steps=2, layout_cleanup=0.0))
    (line,) = _warnings(caplog)
    assert "cat, style (global prompt, background prompt, layer 1 prompt)" in line


# ---------------------------------------------------------------------------- command line
@pytest.mark.slow  # a fresh interpreter loads torch and the model
def test_generate_prints_one_warning_line_on_stderr(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "layerdiff", "generate", "--model", "layerdiff-toy", "--steps", "2", "--no-psd",
         "--prompt", "a pink hexagon in front of a brick wall", "--layer", "a brick wall", "--layer", "a pink hexagon",
         "--out", str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.replace("\r", "\n").splitlines() if "does not know" in line]
    assert lines == [f"words the model does not know (not in its training prompts; they steer nothing): pink, hexagon (global prompt, layer 1 prompt); "
                     f"{VOCABULARY_HINT}"]
    assert "Traceback" not in r.stderr and (tmp_path / "out" / "composite.png").is_file()


# ---------------------------------------------------------------------------- nodes
def _node(name):
    return nodes.NODE_CLASS_MAPPINGS[name]()


def _chain(*prompts):
    chain = None
    for p in prompts:
        chain, _ = _node("LayerDiffLayerPrompt").add(p, chain)
    return chain


def test_prompt_enhancer_shows_the_warning_in_its_output_text_and_the_log(toy, caplog):
    with caplog.at_level(logging.WARNING, logger="layerdiff"):
        out = _node("LayerDiffPromptEnhancer").encode(toy, _chain("a brick wall", "a pink hexagon"), "", "")
    assert set(out) == {"ui", "result"}
    (text,) = out["ui"]["text"]
    assert text.startswith("words the model does not know") and "pink, hexagon" in text
    assert _warnings(caplog) == [text]  # ComfyUI's log gets the same line
    (cond,) = out["result"]  # the outputs, sockets and order, are those of RETURN_TYPES
    assert cond.layer_prompts == (("a brick wall", "a pink hexagon"),)


def test_prompt_enhancer_without_unknown_words_returns_its_outputs_only(toy):
    out = _node("LayerDiffPromptEnhancer").encode(toy, _chain("a brick wall", "a red star"), "", "")
    assert isinstance(out, tuple) and len(out) == 1


def test_edit_nodes_show_the_warning_of_their_prompts(toy, stack):
    steps = {"steps": 2, "cfg": 3.0, "sampler_name": "ddim"}
    styled = _node("LayerDiffLayerStyle").style(toy, stack, "watercolour sofa style", 0.3, "1", 1, **steps)
    (text,) = styled["ui"]["text"]
    assert "watercolour, sofa, style (layer 1 prompt \"a red star, watercolour sofa style\")" in text
    assert styled["result"][0].num_layers == stack.num_layers
    edited = _node("LayerDiffLayerEdit").edit(toy, stack, 1, "a pink star", 1, "image only", **steps,
                                              negative_prompt="blurry")
    (text,) = edited["ui"]["text"]
    assert "pink (global prompt, layer 1 prompt)" in text and 'blurry (negative prompt "blurry")' in text
    plain = _node("LayerDiffLayerEdit").edit(toy, stack, 1, "a green heart", 1, "image only", **steps)
    assert isinstance(plain, tuple) and len(plain) == 1
