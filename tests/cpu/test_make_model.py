"""bench/make_model.py: a random-weight model folder pdserve loads like any checkpoint, and serves
with greedy == HF generate (the test shapes; the 1.1B and 8B shapes are the same code; gpt-oss's
with its experts in MXFP4, as released)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from make_model import FIRST_WORD, build  # noqa: E402


@pytest.mark.parametrize("shape", ["test", "qwen3-test", "qwen3-moe-test", "gpt-oss-test"])  # gpt-oss: MXFP4
def test_a_built_model_loads_and_decodes_like_hf(tmp_path: Path, shape: str) -> None:
    from transformers import AutoModelForCausalLM

    from engine.config import ModelConfig
    from engine.model_loader import load_model, load_tokenizer
    from engine.model_runner import ModelRunner, SeqInput

    path = build(shape, tmp_path / "m", dtype="float32")
    cfg = ModelConfig(path=str(path), max_model_len=512)
    tok = load_tokenizer(cfg)
    ids = tok(" t5 t17 t9 t200 t42 t7")["input_ids"]
    assert ids == [FIRST_WORD + k for k in (5, 17, 9, 200, 42, 7)]
    assert tok.apply_chat_template([{"role": "user", "content": "t5"}], add_generation_prompt=True, tokenize=True)
    runner = ModelRunner(load_model(cfg), num_blocks=8, block_size=16)
    toks = [int(runner.forward([SeqInput(ids, 0, list(range(8)))])[0].argmax())]
    for _ in range(5):
        toks.append(int(runner.forward([SeqInput([toks[-1]], len(ids) + len(toks) - 1, list(range(8)))])[0].argmax()))
    hf = AutoModelForCausalLM.from_pretrained(path)
    with torch.inference_mode():
        want = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert toks == want[0, len(ids):].tolist()


def test_its_tokenizer_round_trips_any_text_and_takes_a_grammar(tmp_path: Path) -> None:
    """Byte-level: decoded ids re-encode to the same ids (the benchmarks build prompts so), any text
    encodes, and llguidance accepts it (a word-level vocabulary was refused: guided rows could not be
    benchmarked on a GPU)."""
    from engine.config import ModelConfig
    from engine.model_loader import load_tokenizer
    from llguidance import LLMatcher

    from engine.structured import grammar_text, llguidance_tokenizer

    path = build("test", tmp_path / "m", dtype="float32")
    tok = load_tokenizer(ModelConfig(path=str(path), max_model_len=512))
    words = list(range(FIRST_WORD, len(tok)))
    assert tok(tok.decode(words))["input_ids"] == words
    text = 'héllo {"a": [1, 2]}\n\t ok'
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok("<|im_end|>")["input_ids"] == [2]
    ll = llguidance_tokenizer(tok, len(tok))
    schema = '{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}'
    matcher = LLMatcher(ll, grammar_text("json_schema", schema))
    answer = tok('{"a":12}')["input_ids"]
    assert answer[0] == 3 + ord("{")
    assert all(matcher.consume_token(t) for t in answer), matcher.get_error()
    assert matcher.is_accepting()
    assert not LLMatcher(ll, grammar_text("json_schema", schema)).consume_token(FIRST_WORD)
