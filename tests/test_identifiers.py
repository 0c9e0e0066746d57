"""Rare identifiers (issue 16): the byte tokenizers of `tiny` and `toy` keep each identifier as one
token of its own that no class, colour or scene word shares, with an embedding row to train."""
import sys
from pathlib import Path

import pytest
import torch

from comfusion.config import SubjectSpec, load_config
from comfusion.models import add_identifier_tokens, build_byte_tokenizer, load_base
from comfusion.prompts import DEFAULT_IDENTIFIER, IDENTIFIER_TOKENS, PAPER_SCENES, instance_scene_text
from comfusion.toy import world

REPO = Path(__file__).resolve().parents[1]

WORDS = sorted({w for text in (*world.CLASS_NOUNS, *world.COLOURS, *world.WORLD_SCENES, *PAPER_SCENES)
                for w in text.lower().split()})


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("name", ["tiny", "toy"])
def test_identifier_is_one_token_shared_with_no_class_or_scene_word(name):
    base = load_base(name)
    tok, text_encoder = base["tokenizer"], base["text_encoder"]
    word_ids = {i for w in WORDS for i in _ids(tok, w)}
    for identifier in IDENTIFIER_TOKENS:
        ids = _ids(tok, instance_scene_text(identifier, "ball", "in the snow"))  # "a sks ball in the snow"
        (own,) = _ids(tok, identifier)  # exactly one token
        assert ids.count(own) == 1 and ids[1] == own
        assert own not in word_ids
        assert ids[:1] + ids[2:] == _ids(tok, "a ball in the snow")  # the other words keep their tokens
    assert text_encoder.get_input_embeddings().weight.shape[0] == len(tok)
    assert len(set(_ids(tok, " ".join(IDENTIFIER_TOKENS)))) == len(IDENTIFIER_TOKENS)


def test_identifiers_match_whole_words_only():
    tok = build_byte_tokenizer()
    (sks,) = _ids(tok, "sks")
    assert sks not in _ids(tok, "tasks") and sks not in _ids(tok, "sksx")
    assert _ids(tok, "SKS") == [sks]  # lower-cased like every CLIP prompt


def test_identifier_rows_start_as_documented_and_leave_the_rest_alone():
    tok = build_byte_tokenizer(identifiers=())
    base = load_base("toy")["text_encoder"]
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(3)
    enc = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, vocab_size=len(tok)))
    before = enc.get_input_embeddings().weight.detach().clone()
    rng = torch.get_rng_state()
    ids = add_identifier_tokens(tok, enc, seed=0)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is not drawn from
    weight = enc.get_input_embeddings().weight.detach()
    assert ids == list(range(len(before), len(before) + len(IDENTIFIER_TOKENS))) and len(tok) == len(weight)
    assert torch.equal(weight[: len(before)], before)
    g = torch.Generator().manual_seed(0)
    expected = before.mean(0) + before.std(0) * torch.randn(len(ids), before.shape[1], generator=g)
    assert torch.allclose(weight[len(before):], expected)
    assert add_identifier_tokens(tok, enc) == []  # already there: nothing added
    assert base.get_input_embeddings().weight.shape[0] == 514 + len(IDENTIFIER_TOKENS)


def test_default_demo_and_benchmark_identifiers_are_reserved(monkeypatch):
    assert SubjectSpec(id="x", images=("a.png",), class_noun="ball").identifier == DEFAULT_IDENTIFIER
    assert DEFAULT_IDENTIFIER in IDENTIFIER_TOKENS
    demo = load_config(REPO / "configs" / "demo.yaml")
    assert {s.identifier for s in demo.data.subjects} <= set(IDENTIFIER_TOKENS)
    import importlib.util

    spec = importlib.util.spec_from_file_location("toy_quality", REPO / "benchmarks" / "toy_quality.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "toy_quality", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    assert module.IDENTIFIER in IDENTIFIER_TOKENS
