"""Batched evaluation generation: left padding, stop strings, seeded sampling, model loading."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama, make_word_tokenizer

from balora.evaluation.generation import (
    GenerationSettings,
    format_prompt,
    generate,
    load_for_eval,
    truncate_at_stop,
)

SHORT = "w5 w6 w7"
LONGER = ["w10 w11 w12 w13 w14 w15 w16 w17 w18", "w20 w21 w22 w23 w24 w25"]


@pytest.fixture(scope="module")
def lm():
    return make_tiny_llama(seed=1), make_word_tokenizer()


def _greedy(model, tok, prompts, **kw):
    return generate(model, tok, prompts, GenerationSettings(max_new_tokens=10, **kw))


def test_left_padding_batch_gives_the_single_prompt_completion(lm):
    model, tok = lm
    alone = _greedy(model, tok, [SHORT])
    batched = _greedy(model, tok, [LONGER[0], SHORT, LONGER[1]], batch_size=3)
    assert batched.completions[1] == alone.completions[0]
    assert batched.num_tokens[1] == alone.num_tokens[0]
    for i, p in ((0, LONGER[0]), (2, LONGER[1])):  # order restored after sorting by length
        assert batched.completions[i] == _greedy(model, tok, [p]).completions[0]
    # The same with a batch smaller than the prompt count (several batches).
    assert _greedy(model, tok, [LONGER[0], SHORT, LONGER[1]], batch_size=2).completions \
        == batched.completions


def test_stop_strings_cut_the_completion_and_end_generation_early(lm):
    model, tok = lm
    full = _greedy(model, tok, [SHORT]).completions[0][0]
    words = full.split()
    # The first word from the third on that is not inside the text before it ("w6" is in "w60").
    i = next(i for i in range(2, len(words)) if words[i] not in " ".join(words[:i]))
    cut = _greedy(model, tok, [SHORT], stop=(words[i],))
    assert cut.completions[0][0] == full[:full.index(words[i])]
    assert cut.num_tokens[0][0] == i + 1  # stopped on the token that completed the stop string


def test_stop_string_starting_in_the_prompt_does_not_stop(lm):
    model, tok = lm
    first = _greedy(model, tok, [SHORT]).completions[0][0].split()[0]
    # "w7 <first>" spans the prompt/completion boundary: only the completion is searched.
    out = _greedy(model, tok, [SHORT], stop=(f"w7 {first}",))
    assert out.num_tokens[0][0] == 10


def test_truncate_at_stop_takes_the_earliest():
    assert truncate_at_stop("a\n#x\ndef f", ["\ndef ", "\n#"]) == "a"
    assert truncate_at_stop("abc", ["z"]) == "abc"
    assert truncate_at_stop("abc", []) == "abc"


def test_sampling_is_seeded_and_reproducible(lm):
    model, tok = lm
    settings = dict(max_new_tokens=6, n_samples=3, temperature=1.0, top_p=0.95, batch_size=6)
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    a = generate(model, tok, [SHORT, LONGER[1]], GenerationSettings(seed=7, **settings))
    assert torch.equal(torch.rand(1), expected)  # the global RNG is left alone
    b = generate(model, tok, [SHORT, LONGER[1]], GenerationSettings(seed=7, **settings))
    c = generate(model, tok, [SHORT, LONGER[1]], GenerationSettings(seed=8, **settings))
    assert [len(x) for x in a.completions] == [3, 3]
    assert a.completions == b.completions
    assert a.completions != c.completions
    assert len(set(a.completions[0])) > 1  # samples differ from each other


def test_throughput_counts_generated_tokens(lm):
    model, tok = lm
    out = _greedy(model, tok, [SHORT, LONGER[0]])
    t = out.throughput()
    assert t["generated_tokens"] == sum(n for ns in out.num_tokens for n in ns) > 0
    assert t["tokens_per_second"] > 0 and t["wall_seconds"] > 0


def test_settings_are_checked():
    with pytest.raises(ValueError, match="temperature > 0"):
        GenerationSettings(n_samples=2)
    with pytest.raises(ValueError):
        GenerationSettings(top_p=0.0, temperature=1.0)


def test_peft_and_merged_models_generate_alike(lm):
    from peft import LoraConfig, get_peft_model

    _, tok = lm
    base = make_tiny_llama(seed=2)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    peft_model.eval()
    with_adapter = _greedy(peft_model, tok, [SHORT, LONGER[0]], batch_size=2).completions
    merged = peft_model.merge_and_unload()
    assert _greedy(merged, tok, [SHORT, LONGER[0]], batch_size=2).completions == with_adapter
    assert with_adapter != _greedy(make_tiny_llama(seed=2), tok, [SHORT, LONGER[0]],
                                   batch_size=2).completions


def test_prompt_formats():
    from balora.training.data import ALPACA_PROMPT

    assert format_prompt("How many?") == ALPACA_PROMPT.format(query="How many?")
    assert format_prompt("x", "plain") == "x"
    with pytest.raises(ValueError, match="chat template"):
        format_prompt("x", "chat", make_word_tokenizer())


def test_load_for_eval_model_and_run_directories(tmp_path, lm):
    from balora.core.adapters import build_peft_model
    from balora.core.export import save_adapter
    from balora.training.run_config import dump_run_config, run_config_from_dict

    _, tok = lm
    model_dir = tmp_path / "model"
    make_tiny_llama(seed=3).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    plain = load_for_eval(str(model_dir), device="cpu")
    assert plain.kind == "model" and plain.load_base is None
    assert plain.tokenizer.padding_side == "left"

    run = tmp_path / "run"
    run.mkdir()
    cfg = run_config_from_dict({"method": "lora", "output_dir": str(run),
                                "model": {"name": str(model_dir), "task": "nlg"},
                                "adapter": {"r": 4}})
    dump_run_config(cfg, run / "config.yaml")
    peft_model = build_peft_model(make_tiny_llama(seed=3), cfg.adapter_config(), "nlg")
    with torch.no_grad():  # a trained-looking adapter: B != 0
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    save_adapter(peft_model, run / "adapter",
                 {"method": "lora", "init_seed": 0, "base_model": str(model_dir)})
    tok.save_pretrained(run / "adapter")

    loaded = load_for_eval(str(run), device="cpu")
    assert loaded.kind == "run" and loaded.base_spec == str(model_dir)
    expected = _greedy(peft_model.eval(), tok, [SHORT]).completions
    assert _greedy(loaded.model, loaded.tokenizer, [SHORT]).completions == expected
    base = loaded.load_base()
    assert _greedy(base.model, base.tokenizer, [SHORT]).completions \
        == _greedy(plain.model, plain.tokenizer, [SHORT]).completions

    adapter_only = load_for_eval(str(run / "adapter"), device="cpu")
    assert adapter_only.kind == "adapter"
    assert _greedy(adapter_only.model, adapter_only.tokenizer, [SHORT]).completions == expected


def test_load_for_eval_explains_a_bad_spec(tmp_path):
    with pytest.raises(OSError, match="not a run directory"):
        load_for_eval(str(tmp_path / "nothing-here"), device="cpu")
