"""Prompt parsing (A1111 attention syntax), templates, and compel encoding against the tiny SD 1.5 kit."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from studio.draft.embeds import PromptEmbeddings, encode_prompts
from studio.errors import InputError, ModelError
from studio.prompts import Fragment, fill_template, parse_prompt

W = 77  # CLIP window: bos + 75 tokens + eos


@pytest.fixture(scope="module")
def pipe(tiny_kit: Path) -> StableDiffusionPipeline:
    """The tiny SD 1.5 pipeline (real CLIP tokenizer, hidden size 32)."""
    return StableDiffusionPipeline.from_pretrained(tiny_kit / "tiny-sd15", safety_checker=None)


def _pairs(text: str) -> list[list[tuple[str, float]]]:
    return [[(f.text, f.weight) for f in segment] for segment in parse_prompt(text)]


def _reference(pipe: StableDiffusionPipeline, text: str) -> torch.Tensor:
    """diffusers' own (truncating) encoding of one prompt: [1, 77, C]."""
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(text, pipe.device, 1, False)
    return embeds


# ---------------------------------------------------------------- parser


PARSE_TABLE = [
    ("plain text", [[("plain text", 1.0)]]),
    ("(a)", [[("a", 1.1)]]),
    ("((a))", [[("a", 1.21)]]),
    ("[a]", [[("a", 1 / 1.1)]]),
    ("[[a]]", [[("a", 1 / 1.21)]]),
    ("(a:1.3)", [[("a", 1.3)]]),
    ("(a:0.5)", [[("a", 0.5)]]),
    ("(a: 1.3 )", [[("a", 1.3)]]),
    ("(a:0)", [[("a", 0.0)]]),
    ("((a:1.2) b)", [[("a", 1.32), (" b", 1.1)]]),
    ("((a):1.5)", [[("a", 1.65)]]),
    ("[(a:1.5)]", [[("a", 1.5 / 1.1)]]),
    (r"\(a\)", [[("(a)", 1.0)]]),
    (r"\[a\]", [[("[a]", 1.0)]]),
    (r"a\\b", [[("a\\b", 1.0)]]),
    (r"(\(a\))", [[("(a)", 1.1)]]),
    (r"a \ b", [[("a  b", 1.0)]]),  # A1111 drops a lone backslash
    ("(a", [[("a", 1.1)]]),
    ("x (a", [[("x ", 1.0), ("a", 1.1)]]),
    ("[a", [[("a", 1 / 1.1)]]),
    ("a)", [[("a)", 1.0)]]),
    ("a]", [[("a]", 1.0)]]),
    ("a:1.3)", [[("a:1.3)", 1.0)]]),
    ("(a:1.3", [[("a:1.3", 1.1)]]),
    ("a: b", [[("a: b", 1.0)]]),
    ("[a:b]", [[("a:b", 1 / 1.1)]]),  # no number after the last ':': not prompt editing in A1111 either
    (r"\[a:b:0.5\]", [[("[a:b:0.5]", 1.0)]]),  # escaped: literal text
    (r"[a\|b]", [[("a|b", 1 / 1.1)]]),
    ("a | b", [[("a | b", 1.0)]]),  # '|' outside brackets is text
    ("SANDY band, ANDY, x_AND_y, rock and roll", [[("SANDY band, ANDY, x_AND_y, rock and roll", 1.0)]]),
    ("a <b> c", [[("a <b> c", 1.0)]]),
    ("(a)(b)", [[("ab", 1.1)]]),
    ("a (b) c", [[("a ", 1.0), ("b", 1.1), (" c", 1.0)]]),
    ("(a)[b]", [[("a", 1.1), ("b", 1 / 1.1)]]),
    ("a()b", [[("ab", 1.0)]]),
    ("", [[("", 1.0)]]),
    ("()", [[("", 1.0)]]),
    # A1111's own doctest examples (modules/prompt_parser.py)
    ("an (important) word", [[("an ", 1.0), ("important", 1.1), (" word", 1.0)]]),
    ("(unbalanced", [[("unbalanced", 1.1)]]),
    (r"\(literal\]", [[("(literal]", 1.0)]]),
    ("(unnecessary)(parens)", [[("unnecessaryparens", 1.1)]]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            [
                ("a ", 1.0),
                ("house", 1.573),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641),
                (".", 1.1),
            ]
        ],
    ),
    # BREAK: an uppercase separate word starts a new segment
    ("a BREAK b", [[("a", 1.0)], [("b", 1.0)]]),
    ("a\nBREAK\tb", [[("a", 1.0)], [("b", 1.0)]]),
    ("(a BREAK b)", [[("a", 1.1)], [("b", 1.1)]]),
    ("a, (b) BREAK c", [[("a, ", 1.0), ("b", 1.1)], [("c", 1.0)]]),
    ("a BREAK BREAK b", [[("a", 1.0)], [("", 1.0)], [("b", 1.0)]]),
    ("BREAK a", [[("", 1.0)], [("a", 1.0)]]),
    ("a BREAK", [[("a", 1.0)]]),
    ("BREAKfast", [[("BREAKfast", 1.0)]]),
    ("aBREAK b", [[("aBREAK b", 1.0)]]),
    ("a break b", [[("a break b", 1.0)]]),
    ("a_BREAK_b", [[("a_BREAK_b", 1.0)]]),
]


@pytest.mark.parametrize(("text", "expected"), PARSE_TABLE, ids=[repr(t) for t, _ in PARSE_TABLE])
def test_parse_prompt_table(text: str, expected: list[list[tuple[str, float]]]) -> None:
    got = _pairs(text)
    assert [[t for t, _ in seg] for seg in got] == [[t for t, _ in seg] for seg in expected]
    for got_segment, expected_segment in zip(got, expected, strict=True):
        assert [w for _, w in got_segment] == pytest.approx([w for _, w in expected_segment], rel=1e-12)


def test_parse_prompt_returns_frozen_fragments() -> None:
    fragment = parse_prompt("(a)")[0][0]
    assert fragment == Fragment("a", pytest.approx(1.1))
    with pytest.raises(AttributeError):
        fragment.weight = 2.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("(cat:-1)", "cat"),
        ("(cat:-0.5)", "cat"),
        ("(cat:1.2.3)", "cat"),
        ("(cat:.)", "cat"),
        ("(cat:+.)", "cat"),
    ],
)
def test_parse_prompt_rejects_unusable_weights(text: str, named: str) -> None:
    with pytest.raises(InputError) as err:
        parse_prompt(text)
    assert named in str(err.value)
    assert "(word:1.2)" in str(err.value)


@pytest.mark.parametrize(
    ("text", "construct", "fragment"),
    [
        ("a [cat:dog:0.5] b", "prompt editing", "[cat:dog:0.5]"),
        ("[cat:dog:10]", "prompt editing", "[cat:dog:10]"),
        ("[cat:0.25]", "prompt editing", "[cat:0.25]"),
        ("[cat::5]", "prompt editing", "[cat::5]"),
        ("[a:1.3]", "prompt editing", "[a:1.3]"),  # A1111 reads this as editing, not as de-emphasis
        ("[(cat:1.2):dog:0.5]", "prompt editing", "[(cat:1.2):dog:0.5]"),
        ("a [cat|dog] b", "alternation", "[cat|dog]"),
        ("[cat|dog|]", "alternation", "[cat|dog|]"),
        ("([cat|dog]:1.2)", "alternation", "[cat|dog]"),
        ("a cat AND a dog", "composable diffusion", "AND"),
        ("a cat AND a dog :1.2", "composable diffusion", "AND"),
        ("a <lora:film:0.8> portrait", "extra-network tag", "<lora:film:0.8>"),
        ("<hypernet:x:1>", "extra-network tag", "<hypernet:x:1>"),
    ],
)
def test_parse_prompt_refuses_a1111_syntax_it_does_not_implement(
    text: str, construct: str, fragment: str
) -> None:
    with pytest.raises(InputError) as err:
        parse_prompt(text)
    message = str(err.value)
    assert construct in message and repr(fragment).strip("'") in message
    assert err.value.fix


def test_refused_brackets_say_how_to_keep_them_as_text() -> None:
    with pytest.raises(InputError, match=r"escape the brackets as \\\[ and \\\]"):
        parse_prompt("[a|b]")


def test_parse_prompt_rejects_infinite_weight() -> None:
    with pytest.raises(InputError, match="cat"):
        parse_prompt("(cat:" + "9" * 400 + ")")
    with pytest.raises(InputError, match="dog"):  # finite factors whose product overflows
        parse_prompt("((dog:1" + "0" * 200 + "):1" + "0" * 200 + ")")


# ---------------------------------------------------------------- templates


def test_fill_template() -> None:
    template = "portrait of a {age} year old {who}, {who} smiling, {{not a field}}"
    got = fill_template(template, {"age": "30", "who": "woman", "unused": "x"})
    assert got == "portrait of a 30 year old woman, woman smiling, {not a field}"
    assert fill_template("no placeholders (a:1.2)", {}) == "no placeholders (a:1.2)"


def test_fill_template_names_every_missing_variable() -> None:
    template = "a {age} year old {gender} in {city}"
    with pytest.raises(InputError) as err:
        fill_template(template, {"city": "Paris"})
    message = str(err.value)
    assert "age, gender" in message
    assert template in message
    assert "--var age=" in message and "--var gender=" in message
    assert "--var city=" not in message


@pytest.mark.parametrize("placeholder", ["{a.b}", "{a!r}", "{a:>10}", "{a[0]}", "{0}", "{}", "{a b}"])
def test_fill_template_rejects_fancy_placeholders(placeholder: str) -> None:
    with pytest.raises(InputError) as err:
        fill_template(f"x {placeholder} y", {"a": "1", "0": "2", "a b": "3"})
    assert placeholder in str(err.value)
    assert "{name}" in str(err.value)


@pytest.mark.parametrize("template", ["a {age", "a } b", "a {age}}"])
def test_fill_template_rejects_unbalanced_braces(template: str) -> None:
    with pytest.raises(InputError, match="unbalanced braces"):
        fill_template(template, {"age": "30"})


# ---------------------------------------------------------------- encoding (tiny SD 1.5)


@pytest.mark.parametrize(
    ("text", "literal"),
    [
        ("a photo of a cat", "a photo of a cat"),
        (r"portrait, 35mm, \(soft light\)?!", "portrait, 35mm, (soft light)?!"),
        ("", ""),
    ],
)
def test_unweighted_prompt_matches_diffusers(pipe: StableDiffusionPipeline, text: str, literal: str) -> None:
    got = encode_prompts(pipe, [text], ["blurry, low quality"])
    with torch.no_grad():
        ref, ref_neg = pipe.encode_prompt(literal, pipe.device, 1, True, "blurry, low quality")
    assert got.prompt_embeds.shape == (1, W, 32)
    torch.testing.assert_close(got.prompt_embeds, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.negative_prompt_embeds, ref_neg, atol=1e-5, rtol=0)
    assert got.pooled_prompt_embeds is None and got.negative_pooled_prompt_embeds is None
    assert set(got.as_pipeline_kwargs()) == {"prompt_embeds", "negative_prompt_embeds"}


def test_upweighting_scales_only_that_token_away_from_empty(pipe: StableDiffusionPipeline) -> None:
    plain = encode_prompts(pipe, ["a photo of a cat"], [""])
    weighted = encode_prompts(pipe, ["a photo of a (cat:1.5)"], [""])
    empty = plain.negative_prompt_embeds  # the empty prompt's window
    cat = 5  # bos, a, photo, of, a, cat
    diff = (weighted.prompt_embeds - plain.prompt_embeds).abs().amax(dim=-1)[0]  # [77]
    assert diff[cat] > 0.1
    assert torch.count_nonzero(diff).item() == 1
    # compel: empty + w * (z - empty) at the weighted position
    expected = empty[0, cat] + 1.5 * (plain.prompt_embeds[0, cat] - empty[0, cat])
    torch.testing.assert_close(weighted.prompt_embeds[0, cat], expected, atol=1e-5, rtol=1e-5)
    # ((cat)) == (cat:1.21)
    nested = encode_prompts(pipe, ["a photo of a ((cat))"], [""])
    explicit = encode_prompts(pipe, ["a photo of a (cat:1.21)"], [""])
    torch.testing.assert_close(nested.prompt_embeds, explicit.prompt_embeds, atol=1e-6, rtol=0)


def test_downweighting_blends_towards_the_prompt_without_the_word(pipe: StableDiffusionPipeline) -> None:
    text, w, cat = "a photo of a cat in a box", 1 / 1.1, 5
    plain = encode_prompts(pipe, [text], [""])
    down = encode_prompts(pipe, ["a photo of a [cat] in a box"], [""])
    empty = plain.negative_prompt_embeds[0]  # [77, C]
    # the same prompt with "cat" masked out of attention, encoded directly
    ids = pipe.tokenizer(text, padding="max_length", max_length=W, return_tensors="pt").input_ids
    mask = torch.ones_like(ids)
    mask[0, cat] = 0
    with torch.no_grad():
        masked = pipe.text_encoder(ids, attention_mask=mask).last_hidden_state[0]  # [77, C]
    scale = torch.ones(W, 1)
    scale[cat] = w
    base = empty + scale * (plain.prompt_embeds[0] - empty)
    without = empty + scale * (masked - empty)
    t = math.tan((1 - w) * math.pi / 2)  # compel's lerp weight for w < 1
    torch.testing.assert_close(down.prompt_embeds[0], (base + t * without) / (1 + t), atol=1e-5, rtol=1e-5)
    # tokens before the word are untouched; the word and what follows move towards "without"
    torch.testing.assert_close(down.prompt_embeds[0, :cat], plain.prompt_embeds[0, :cat], atol=1e-6, rtol=0)
    moved = (down.prompt_embeds[0] - plain.prompt_embeds[0]).norm(dim=-1)  # [77]
    towards = (down.prompt_embeds[0] - masked).norm(dim=-1) < (plain.prompt_embeds[0] - masked).norm(dim=-1)
    assert bool((moved[cat + 1 :] > 0).all()) and bool(towards[cat + 1 :].all())


def test_long_prompt_is_chunked_and_negative_padded(pipe: StableDiffusionPipeline) -> None:
    long = "cat " * 100
    got = encode_prompts(pipe, [long], ["ugly"])
    assert got.prompt_embeds.shape == (1, 2 * W, 32)
    assert got.negative_prompt_embeds.shape == (1, 2 * W, 32)
    # window 1: first 75 tokens; window 2: the other 25 (no truncation, no CLS copying)
    torch.testing.assert_close(got.prompt_embeds[:, :W], _reference(pipe, "cat " * 75), atol=1e-5, rtol=0)
    torch.testing.assert_close(got.prompt_embeds[:, W:], _reference(pipe, "cat " * 25), atol=1e-5, rtol=0)
    # the negative is padded with the empty prompt's window
    torch.testing.assert_close(got.negative_prompt_embeds[:, :W], _reference(pipe, "ugly"), atol=1e-5, rtol=0)
    torch.testing.assert_close(got.negative_prompt_embeds[:, W:], _reference(pipe, ""), atol=1e-5, rtol=0)


def test_long_prompt_splits_after_a_late_comma_as_a1111(pipe: StableDiffusionPipeline) -> None:
    late = "cat " * 60 + ", " + "dog " * 30  # comma is token 61 of 91: within 20 of the window end
    got = encode_prompts(pipe, [late], [""]).prompt_embeds
    torch.testing.assert_close(got[:, :W], _reference(pipe, "cat " * 60 + ","), atol=1e-5, rtol=0)
    torch.testing.assert_close(got[:, W:], _reference(pipe, "dog " * 30), atol=1e-5, rtol=0)
    early = "cat " * 40 + ", " + "dog " * 50  # comma too far back: split at 75 tokens
    got = encode_prompts(pipe, [early], [""]).prompt_embeds
    torch.testing.assert_close(
        got[:, :W], _reference(pipe, "cat " * 40 + ", " + "dog " * 34), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(got[:, W:], _reference(pipe, "dog " * 16), atol=1e-5, rtol=0)


def test_break_starts_a_new_window(pipe: StableDiffusionPipeline) -> None:
    got = encode_prompts(pipe, ["a cat BREAK a dog", "a cat, a dog"], [""])
    assert got.prompt_embeds.shape == (2, 2 * W, 32)
    torch.testing.assert_close(got.prompt_embeds[0, :W], _reference(pipe, "a cat")[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got.prompt_embeds[0, W:], _reference(pipe, "a dog")[0], atol=1e-5, rtol=0)
    # the short row is padded with the empty window; negatives too
    torch.testing.assert_close(got.prompt_embeds[1, W:], _reference(pipe, "")[0], atol=1e-5, rtol=0)
    assert got.negative_prompt_embeds.shape == (2, 2 * W, 32)
    # an inner empty segment is an empty window; a trailing BREAK adds nothing
    assert encode_prompts(pipe, ["a BREAK BREAK b"], [""]).prompt_embeds.shape[1] == 3 * W
    assert encode_prompts(pipe, ["a BREAK"], [""]).prompt_embeds.shape[1] == W


def test_batch_rows_are_distinct_and_match_single_encodings(pipe: StableDiffusionPipeline) -> None:
    got = encode_prompts(pipe, ["a red cat", "a (blue:1.3) dog, " + "x " * 80], ["blurry", "dark"])
    assert got.prompt_embeds.shape == (2, 2 * W, 32)
    assert got.negative_prompt_embeds.shape == (2, 2 * W, 32)
    assert (got.prompt_embeds[0] - got.prompt_embeds[1]).abs().max() > 0.1
    assert (got.negative_prompt_embeds[0] - got.negative_prompt_embeds[1]).abs().max() > 0.1
    first = encode_prompts(pipe, ["a red cat"], ["blurry"])
    torch.testing.assert_close(got.prompt_embeds[0, :W], first.prompt_embeds[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(
        got.negative_prompt_embeds[0, :W], first.negative_prompt_embeds[0], atol=1e-6, rtol=0
    )
    # one negative serves the whole batch
    shared = encode_prompts(pipe, ["a red cat", "a dog"], ["blurry"])
    torch.testing.assert_close(
        shared.negative_prompt_embeds[0], shared.negative_prompt_embeds[1], atol=0, rtol=0
    )


def test_whitespace_fragments_and_empty_brackets_encode(pipe: StableDiffusionPipeline) -> None:
    got = encode_prompts(pipe, ["a cat [ ] ( )", "[ ]"], [""])
    torch.testing.assert_close(got.prompt_embeds[0], _reference(pipe, "a cat")[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got.prompt_embeds[1], _reference(pipe, "")[0], atol=1e-5, rtol=0)


def test_text_encoder_dtype_is_respected(tiny_kit: Path) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_kit / "tiny-sd15", safety_checker=None)
    pipe.text_encoder.to(torch.bfloat16)
    got = encode_prompts(pipe, ["a (cat:1.2)"], ["dog"])
    assert got.prompt_embeds.dtype == torch.bfloat16 and got.negative_prompt_embeds.dtype == torch.bfloat16
    assert got.prompt_embeds.device == pipe.device


def test_prompt_embeddings_kwargs() -> None:
    a, b, c = torch.zeros(1, W, 4), torch.ones(1, W, 4), torch.ones(1, 8)
    kwargs = PromptEmbeddings(
        a, b, pooled_prompt_embeds=c, negative_pooled_prompt_embeds=c
    ).as_pipeline_kwargs()
    assert list(kwargs) == [
        "prompt_embeds",
        "negative_prompt_embeds",
        "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds",
    ]
    assert PromptEmbeddings(a, b).as_pipeline_kwargs() == {"prompt_embeds": a, "negative_prompt_embeds": b}


@pytest.mark.parametrize(
    ("prompts", "negatives", "match"),
    [
        ("a cat", [""], "list of strings"),
        (["a cat"], "", "list of strings"),
        ([], [""], "No prompts"),
        (["a", "b", "c"], ["x", "y"], "3 prompts but 2 negative"),
    ],
)
def test_encode_prompts_rejects_bad_batches(
    pipe: StableDiffusionPipeline, prompts: list[str], negatives: list[str], match: str
) -> None:
    with pytest.raises(InputError, match=match):
        encode_prompts(pipe, prompts, negatives)


def test_encode_prompts_needs_a_clip_text_encoder() -> None:
    with pytest.raises(ModelError, match="tokenizer/text_encoder"):
        encode_prompts(object(), ["a cat"], [""])  # type: ignore[arg-type]


# ---------------------------------------------------------------- encoding (tiny SDXL, when the kit has one)


def test_sdxl_matches_diffusers_and_pads(tiny_kit: Path) -> None:
    folder = tiny_kit / "tiny-sdxl"
    if not folder.exists():
        pytest.skip("the tiny kit has no tiny-sdxl yet")
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    got = encode_prompts(pipe, ["a photo of a cat"], ["blurry"])
    with torch.no_grad():
        ref = pipe.encode_prompt("a photo of a cat", device=pipe.device, negative_prompt="blurry")
    for ours, theirs in zip(
        (
            got.prompt_embeds,
            got.negative_prompt_embeds,
            got.pooled_prompt_embeds,
            got.negative_pooled_prompt_embeds,
        ),
        ref,
        strict=True,
    ):
        assert ours is not None
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    channels = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    long = encode_prompts(pipe, ["cat " * 100, "a BREAK b"], ["ugly"])
    assert long.prompt_embeds.shape == (2, 2 * W, channels)
    assert long.negative_prompt_embeds.shape == (2, 2 * W, channels)
    assert long.pooled_prompt_embeds is not None
    assert long.pooled_prompt_embeds.shape == (2, pipe.text_encoder_2.config.projection_dim)
    assert set(long.as_pipeline_kwargs()) == {
        "prompt_embeds",
        "negative_prompt_embeds",
        "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds",
    }


def test_cached_encoding_follows_a_text_encoder_change_between_states(pipe: StableDiffusionPipeline) -> None:
    """A LoRA on the text encoder changes its output, the empty-prompt padding included: an encoder kept
    across requests must give, under the new state, what a one-off encoding gives."""
    from studio.draft.embeds import PromptEncoder

    encoder, texts = PromptEncoder(), (["a photo of a (cat:1.3)"], ["blurry"])
    before = encoder.encode(pipe, *texts, state="no lora")
    norms = [m for m in pipe.text_encoder.modules() if isinstance(m, torch.nn.LayerNorm)]
    bias = norms[-1].bias  # the final layer norm
    with torch.no_grad():
        bias += 0.5  # what a text-encoder LoRA does: other outputs for the same tokens
    try:
        after = encoder.encode(pipe, *texts, state="lora")
        fresh = encode_prompts(pipe, *texts)
    finally:
        with torch.no_grad():
            bias -= 0.5
    assert not torch.allclose(before.prompt_embeds, after.prompt_embeds)
    torch.testing.assert_close(after.prompt_embeds, fresh.prompt_embeds, atol=1e-6, rtol=0)
    torch.testing.assert_close(after.negative_prompt_embeds, fresh.negative_prompt_embeds, atol=1e-6, rtol=0)
