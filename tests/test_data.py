"""calibra.data: loaders, chat rendering, tokenization (determinism, packing, padding mask,
de-duplication, too little data), config validation, the seq_len cap, memory estimate, hub sets
(on local fixtures: no test touches the network) and recommended sample counts.

Tokenizers are built here from a word-level vocabulary, so one word is one token and every count
in these tests can be stated exactly.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from tokenizers import Tokenizer, models, pre_tokenizers, processors  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from calibra.data import (  # noqa: E402
    CalibrationConfig,
    CalibrationDataset,
    HubUnavailableError,
    estimate_memory,
    recommended_samples,
    resolve_config,
    tokenize_calibration,
)
from calibra.data import hub as hub_mod  # noqa: E402
from calibra.data.tokenize import fingerprint  # noqa: E402

SPECIALS = {"[UNK]": 0, "[EOS]": 1, "[BOS]": 2, "[PAD]": 3}
EOS, BOS, PAD = 1, 2, 3
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} [EOS] {% endfor %}"


def words(n: int, tag: str = "w") -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


def make_tokenizer(*, pad: bool = True, bos: bool = False, chat: bool = False, n_words: int = 400):
    """Word-level tokenizer: [UNK] [EOS] [BOS] [PAD], < > / punctuation, then w0..wN, a0..aN, ..."""
    vocab = dict(SPECIALS)
    for tok in ["<", ">", "user", "assistant", "system", "hello", "hi", "there"]:
        vocab[tok] = len(vocab)
    for tag in "wabcdefgxyz":
        for i in range(n_words):
            vocab[f"{tag}{i}"] = len(vocab)
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        t.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", BOS)])
    kwargs = dict(unk_token="[UNK]", eos_token="[EOS]", bos_token="[BOS]")
    if pad:
        kwargs["pad_token"] = "[PAD]"
    tok = PreTrainedTokenizerFast(tokenizer_object=t, **kwargs)
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def distinct_texts(n: int, length, tags="abcdefg"):
    """n texts of distinct words; length is an int or a per-text list."""
    lengths = length if isinstance(length, list) else [length] * n
    out = []
    for i, m in enumerate(lengths):
        tag = tags[i % len(tags)]
        base = (i // len(tags)) * 40
        out.append(" ".join(f"{tag}{base + j}" for j in range(m)))
    return out


def cfg(**kw):
    base = dict(num_samples=4, sequence_length=16, batch_size=1, seed=0)
    base.update(kw)
    return CalibrationConfig(**base)


# ============================================================================ loaders
def test_txt_blank_line_separated(tmp_path):
    p = tmp_path / "cal.txt"
    p.write_bytes(b"first sample\nstill first\n\n\n  \nsecond\n    indented line\r\n\r\nthird\n\n")
    ds = CalibrationDataset.from_local(p)
    assert ds.samples == ("first sample\nstill first", "second\n    indented line", "third")
    assert ds.name == "cal.txt" and ds.version.startswith("sha256:")


def test_json_array(tmp_path):
    p = tmp_path / "cal.json"
    p.write_text(json.dumps(["one", "two", {"text": "three"}]))
    assert CalibrationDataset.from_local(p).samples == ("one", "two", "three")
    p.write_text(json.dumps({"text": "x"}))
    with pytest.raises(ValueError, match=r"cal\.json.*array of strings"):
        CalibrationDataset.from_local(p)
    p.write_text(json.dumps(["ok", 5]))
    with pytest.raises(TypeError, match=r"cal\.json\[1\]"):
        CalibrationDataset.from_local(p)
    p.write_text('["a",\n oops]')
    with pytest.raises(ValueError, match=r"cal\.json:2: invalid JSON"):
        CalibrationDataset.from_local(p)


def test_jsonl_text_and_messages(tmp_path):
    p = tmp_path / "cal.jsonl"
    rows = [{"text": "plain one"}, {}, {"messages": [{"role": "user", "content": "hi"}]}]
    p.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[2]) + "\n")
    ds = CalibrationDataset.from_local(p)
    assert ds.samples[0] == "plain one"
    assert ds.samples[1].messages == ({"role": "user", "content": "hi"},)
    assert ds.samples[1].origin == "cal.jsonl:3" and ds.has_chat
    p.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"cal\.jsonl:2: invalid JSON"):
        CalibrationDataset.from_local(p)
    p.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"cal\.jsonl:2: expected .*text.*messages.*keys content"):
        CalibrationDataset.from_local(p)
    p.write_text(json.dumps({"messages": [{"content": "no role"}]}) + "\n")
    with pytest.raises(ValueError, match=r"cal\.jsonl:1: message 0"):
        CalibrationDataset.from_local(p)


def test_folder_unsupported_and_missing(tmp_path):
    (tmp_path / "b.txt").write_text("bee\n\nbee two")
    (tmp_path / "a.json").write_text(json.dumps(["ay"]))
    (tmp_path / "notes.md").write_text("ignored")
    assert CalibrationDataset.from_local(tmp_path).samples == ("ay", "bee", "bee two")
    bad = tmp_path / "data.csv"
    bad.write_text("x")
    with pytest.raises(ValueError, match=r"unsupported.*'\.csv'.*\.txt, \.json, \.jsonl"):
        CalibrationDataset.from_local(bad)
    with pytest.raises(FileNotFoundError, match="builtin"):
        CalibrationDataset.from_local(tmp_path / "nope.jsonl")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt: not UTF-8"):
        CalibrationDataset.from_local(tmp_path / "latin1.txt")


def test_programmatic_name_version():
    a = CalibrationDataset(samples=["x", "y"], name="mine")
    b = CalibrationDataset(samples=["x", "y"])
    c = CalibrationDataset(samples=["y", "x"])
    assert a.name == "mine" and a.version == b.version != c.version
    assert CalibrationDataset(samples=["x"], version="v7").version == "v7"
    with pytest.raises(TypeError, match="single string"):
        CalibrationDataset(samples="just one string")


def test_from_source_resolution(tmp_path, monkeypatch):
    p = tmp_path / "s.txt"
    p.write_text("alpha\n\nbeta")
    assert CalibrationDataset.from_source(str(p)).samples == ("alpha", "beta")
    assert CalibrationDataset.from_source("builtin").name == "builtin"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CalibrationDataset.from_source(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match=r"unknown dataset 'pile'.*c4, wikitext2, bartowski-v3, the-stack"):
        CalibrationDataset.from_source("pile")


# ============================================================================ chat templates
def test_chat_rows_rendered_with_template(tmp_path):
    p = tmp_path / "chats.jsonl"
    convo = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]
    p.write_text(json.dumps({"text": "w1 w2"}) + "\n" + json.dumps({"messages": convo}) + "\n")
    ds = CalibrationDataset.from_local(p)
    tok = make_tokenizer(chat=True, bos=True)
    assert ds.texts(tok) == ["w1 w2", "<user> hello [EOS] <assistant> hi there [EOS] "]
    # truncate packing: the chat row gets no extra BOS (the template owns its special tokens),
    # the plain row gets the tokenizer's default BOS
    with pytest.warns(UserWarning, match="14 real tokens"):
        out = tokenize_calibration(ds, tok, cfg(num_samples=2, packing="truncate", min_tokens=1))
    rows = {tuple(r[m].tolist()) for r, m in zip(out.input_ids, out.attention_mask)}
    assert rows == {
        (BOS, tok.convert_tokens_to_ids("w1"), tok.convert_tokens_to_ids("w2")),
        tuple(tok.encode(ds.texts(tok)[1], add_special_tokens=False)),
    }
    assert tok.encode(ds.texts(tok)[1], add_special_tokens=False).count(EOS) == 2


def test_chat_without_template_names_file_and_line(tmp_path):
    p = tmp_path / "chats.jsonl"
    p.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"messages": [{"role": "user", "content": "x"}]}))
    ds = CalibrationDataset.from_local(p)
    with pytest.raises(ValueError, match=r"chats\.jsonl:2: .*chat template"):
        tokenize_calibration(ds, make_tokenizer(), cfg(num_samples=1))
    with pytest.raises(ValueError, match=r"chats\.jsonl:2"):
        ds.texts(None)


# ============================================================================ tokenization
def test_concat_chunks_are_whole_texts_joined_by_eos(tok):
    texts = distinct_texts(30, [3 + (7 * i) % 11 for i in range(30)])
    out = tokenize_calibration(CalibrationDataset(texts), tok, cfg(num_samples=6, sequence_length=10))
    assert out.input_ids.shape == (6, 10) and out.input_ids.dtype == torch.int64
    assert out.attention_mask.dtype == torch.bool and bool(out.attention_mask.all())
    assert out.token_count == 60
    stream = out.input_ids.flatten().tolist()
    pieces, cur = [], []
    for t in stream:
        if t == EOS:
            pieces.append(cur)
            cur = []
        else:
            cur.append(t)
    encoded = [tok.encode(t, add_special_tokens=False) for t in texts]
    # every piece before the last is one whole text, none repeated; the last is a prefix of a text
    assert len(pieces) >= 3
    assert all(p in encoded for p in pieces)
    assert len({tuple(p) for p in pieces}) == len(pieces)
    assert any(e[: len(cur)] == cur for e in encoded)


def test_concat_prefixes_bos_when_tokenizer_adds_one():
    tok = make_tokenizer(bos=True)
    out = tokenize_calibration(CalibrationDataset(distinct_texts(20, 9)), tok, cfg(num_samples=5, sequence_length=8))
    assert out.input_ids[:, 0].tolist() == [BOS] * 5
    assert BOS not in out.input_ids[:, 1:].flatten().tolist()


def test_same_seed_same_tokens_different_seed_different():
    tok = make_tokenizer()
    ds = CalibrationDataset(distinct_texts(40, 16))
    for packing in ("concat", "truncate"):
        a = tokenize_calibration(ds, tok, cfg(seed=3, packing=packing))
        b = tokenize_calibration(ds, make_tokenizer(), cfg(seed=3, packing=packing))
        c = tokenize_calibration(ds, tok, cfg(seed=4, packing=packing))
        assert torch.equal(a.input_ids, b.input_ids) and a.fingerprint == b.fingerprint
        assert not torch.equal(a.input_ids, c.input_ids) and a.fingerprint != c.fingerprint
        assert a.seed == 3 and a.dataset == ds.name and a.version == ds.version


def test_fingerprint_covers_ids_and_mask():
    ids = torch.arange(12, dtype=torch.int64).reshape(3, 4)
    mask = torch.ones(3, 4, dtype=torch.bool)
    fp = fingerprint(ids, mask)
    assert len(fp) == 64 and int(fp, 16) >= 0
    ids2 = ids.clone()
    ids2[2, 3] += 1
    mask2 = mask.clone()
    mask2[0, 3] = False
    assert (
        len({fp, fingerprint(ids2, mask), fingerprint(ids, mask2), fingerprint(ids.reshape(4, 3), mask.reshape(4, 3))})
        == 4
    )


def test_padding_without_pad_token_uses_eos_and_masks_exactly():
    tok = make_tokenizer(pad=False)
    assert tok.pad_token_id is None
    lengths = [3, 9, 5, 12, 1, 7]
    texts = distinct_texts(6, lengths)
    with pytest.warns(UserWarning, match="real tokens"):
        out = tokenize_calibration(
            CalibrationDataset(texts), tok, cfg(num_samples=6, sequence_length=8, packing="truncate", batch_size=4)
        )
    assert out.pad_id == EOS
    real = {tuple(tok.encode(t, add_special_tokens=False)[:8]) for t in texts}
    got = set()
    for row, m in zip(out.input_ids, out.attention_mask):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()  # mask is a prefix: right padding
        assert (row[n:] == EOS).all()  # padded positions hold the pad id
        got.add(tuple(row[:n].tolist()))
    assert got == real
    assert out.token_count == int(out.attention_mask.sum()) == sum(min(n, 8) for n in lengths)
    batches = list(out.batches(4))
    assert [b[0].shape[0] for b in batches] == [4, 2]
    assert torch.equal(torch.cat([b[0] for b in batches]), out.input_ids)
    assert torch.equal(torch.cat([b[1] for b in batches]), out.attention_mask)
    with pytest.raises(ValueError, match="batch_size"):
        next(out.batches(0))


def test_raw_tokenizers_object_works():
    raw = make_tokenizer()._tokenizer  # the tokenizers.Tokenizer inside the fast tokenizer
    assert isinstance(raw, Tokenizer)
    texts = distinct_texts(10, 10)
    out = tokenize_calibration(CalibrationDataset(texts), raw, cfg(num_samples=4, sequence_length=10))
    # a raw Tokenizer has no EOS/pad attributes: pad id 0, texts joined without separators, and
    # each 10-token chunk is exactly one 10-word text
    assert out.pad_id == 0 and out.token_count == 40
    encoded = [raw.encode(t, add_special_tokens=False).ids for t in texts]
    assert all(row in encoded for row in out.input_ids.tolist())


def test_padded_batch_hessian_equals_unpadded():
    """Right padding + mask: the Hessian over mask=True rows of a padded batch equals the Hessian
    of the same samples run one by one without padding (float64, eager attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import calibra.ops as ops

    tok = make_tokenizer(pad=False)
    texts = distinct_texts(4, [5, 11, 2, 8])
    with pytest.warns(UserWarning):
        data = tokenize_calibration(
            CalibrationDataset(texts), tok, cfg(num_samples=4, sequence_length=11, packing="truncate", batch_size=4)
        )
    torch.manual_seed(0)
    mcfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(mcfg).to(torch.float64).eval()
    target = model.model.layers[1].mlp.down_proj  # second layer: attention mixes positions first
    captured = []
    hook = target.register_forward_hook(lambda mod, inp, out: captured.append(inp[0].detach()))
    try:
        with torch.no_grad():
            ids, mask = next(data.batches(4))
            model(input_ids=ids, attention_mask=mask.long())
            x = captured.pop()
            d = x.shape[-1]
            H_padded = ops.hessian_accumulate(torch.zeros(d, d, dtype=torch.float64), x[mask])
            H_all = ops.hessian_accumulate(torch.zeros(d, d, dtype=torch.float64), x)
            H_ref = torch.zeros(d, d, dtype=torch.float64)
            for row, m in zip(ids, mask):
                model(input_ids=row[m][None])
                ops.hessian_accumulate(H_ref, captured.pop())
    finally:
        hook.remove()
    scale = H_ref.abs().max()
    print(
        "padded vs unpadded",
        float((H_padded - H_ref).abs().max() / scale),
        "unmasked vs unpadded",
        float((H_all - H_ref).abs().max() / scale),
    )
    assert (H_padded - H_ref).abs().max() <= 1e-12 * scale
    assert (H_all - H_ref).abs().max() > 1e-3 * scale  # without the mask it would be wrong


def test_deduplication_after_whitespace_normalization(tok):
    texts = ["a1 a2 a3", "a1  a2\n a3 ", "b1 b2", "   ", "b1 b2", "c1 c2 c3 c4"]
    ds = CalibrationDataset(texts)
    with pytest.warns(UserWarning, match=r"2 duplicate and 1 empty texts removed"):
        out = tokenize_calibration(ds, tok, cfg(num_samples=3, sequence_length=4, packing="truncate"))
    assert out.num_duplicates == 2 and out.num_empty == 1 and out.num_texts == 3
    assert out.token_count == 3 + 2 + 4
    assert "9 real tokens" in out.summary() and "2 duplicate texts removed" in out.summary()
    with pytest.warns(UserWarning):
        kept = tokenize_calibration(
            ds, tok, cfg(num_samples=5, sequence_length=4, packing="truncate", deduplicate=False)
        )
    assert kept.num_duplicates == 0 and kept.num_texts == 5 and kept.num_samples == 5


# ============================================================================ too little data
def test_floor_error_and_warning(tok):
    ds = CalibrationDataset(distinct_texts(10, 10))  # 100 tokens + 9 EOS separators = 109
    # request 4 x 64 = 256, floor 64: warned, never silent, with the real count
    with pytest.warns(UserWarning, match=r"gave 109 real tokens in 2 samples.*requested 4 samples x 64"):
        out = tokenize_calibration(ds, tok, cfg(num_samples=4, sequence_length=64))
    assert out.num_samples == 2 and out.token_count == 109
    assert out.attention_mask[0].all() and int(out.attention_mask[1].sum()) == 45
    # request 8 x 64 = 512, floor 128: error naming the count and the fixes
    with pytest.raises(
        ValueError,
        match=r"109 real tokens.*floor of 128.*add more text, lower num_samples, "
        r"shorten sequence_length",
    ):
        tokenize_calibration(ds, tok, cfg(num_samples=8, sequence_length=64))
    # an explicit floor accepts less
    with pytest.warns(UserWarning):
        assert tokenize_calibration(ds, tok, cfg(num_samples=8, sequence_length=64, min_tokens=100)).token_count == 109
    # enough data: no warning at all
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tokenize_calibration(ds, tok, cfg(num_samples=4, sequence_length=16)).token_count == 64


def test_empty_dataset_is_an_error(tok, tmp_path):
    p = tmp_path / "empty.txt"
    p.write_text("\n\n   \n")
    with pytest.raises(ValueError, match=r"'empty\.txt' gave 0 real tokens in 0 samples"):
        tokenize_calibration(CalibrationDataset.from_local(p), tok, cfg(min_tokens=0))


# ============================================================================ config
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_samples=0), r"num_samples must be an int >= 1, got 0"),
        (dict(num_samples=True), r"num_samples must be an int"),
        (dict(num_samples=2.0), r"num_samples must be an int"),
        (dict(num_samples=10**9), r"num_samples 1000000000 is above the limit"),
        (dict(sequence_length=0), r"sequence_length must be an int >= 1 or None"),
        (
            dict(sequence_length=4096),
            r"sequence_length 4096 exceeds the model's 2048 positions; "
            r"set sequence_length <= 2048",
        ),
        (dict(batch_size=0), r"batch_size must be an int >= 1"),
        (dict(batch_size=5, num_samples=4), r"batch_size 5 is larger than num_samples 4; set batch_size <= 4"),
        (dict(seed=-1), r"seed must be an int in"),
        (dict(packing="pad"), r"packing must be one of 'concat', 'truncate', got 'pad'"),
        (dict(min_tokens=-1), r"min_tokens must be an int >= 0"),
        (dict(min_tokens=10**6), r"min_tokens 1000000 exceeds the request .* = 64"),
        (dict(deduplicate="yes"), r"deduplicate must be True or False"),
        (dict(dataset="pile"), r"unknown dataset 'pile'"),
        (dict(dataset="no/such/file.jsonl"), r"calibration file 'no/such/file.jsonl' does not exist"),
    ],
)
def test_validate_names_field_and_fix(kwargs, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        cfg(**kwargs).validate(max_positions=2048)


def test_validate_accepts_defaults_and_runs_before_tokenizing(tok):
    CalibrationConfig().validate()
    CalibrationConfig(sequence_length=None, dataset="c4").validate(max_positions=131072)
    with pytest.raises(ValueError, match="exceeds the model's 8 positions"):
        tokenize_calibration(CalibrationDataset(["a1"]), tok, cfg(sequence_length=16), max_positions=8)


def test_unset_sequence_length_capped_and_estimate_printed(capsys):
    from transformers import LlamaConfig

    mcfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        max_position_embeddings=131072,
    )
    resolved, est = resolve_config(CalibrationConfig(sequence_length=None, num_samples=8), mcfg)
    out = capsys.readouterr().out
    assert resolved.sequence_length == 2048 and est.sequence_length == 2048
    note = out.index("sequence_length unset and the model allows 131072 positions: capped at 2048")
    assert note < out.index("peak device memory") and "8 samples x 2048 tokens" in out
    # a short-context model: capped at its own limit
    mcfg.max_position_embeddings = 1024
    assert resolve_config(CalibrationConfig(sequence_length=None), mcfg, echo=lambda s: None)[0].sequence_length == 1024
    # tokenize_calibration caps the same way and says so
    tok = make_tokenizer()
    data = tokenize_calibration(
        CalibrationDataset(distinct_texts(10, 20)), tok, cfg(sequence_length=None, num_samples=4), max_positions=16
    )
    assert data.sequence_length == 16 and "using 16 tokens per sample" in capsys.readouterr().out


def test_unset_batch_size_packs_about_4096_tokens_per_pass(capsys):
    from transformers import LlamaConfig

    from calibra.data.config import AUTO_BATCH_TOKENS

    mcfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        max_position_embeddings=256,
    )
    resolved, est = resolve_config(CalibrationConfig(num_samples=32, batch_size=None), mcfg)
    assert resolved.sequence_length == 256 and resolved.batch_size == AUTO_BATCH_TOKENS // 256 == 16
    assert est.batch_size == 16
    assert "batch_size unset: 16 samples per forward pass (about 4096 tokens)" in capsys.readouterr().out
    # never more than the samples, never less than one
    assert (
        resolve_config(CalibrationConfig(num_samples=3, batch_size=None), mcfg, echo=lambda s: None)[0].batch_size == 3
    )
    mcfg.max_position_embeddings = 8192
    assert (
        resolve_config(
            CalibrationConfig(num_samples=8, sequence_length=8192, batch_size=None), mcfg, echo=lambda s: None
        )[0].batch_size
        == 1
    )
    # an explicit batch size is kept, and a bad one is still an error
    assert resolve_config(CalibrationConfig(num_samples=8, batch_size=2), mcfg, echo=lambda s: None)[0].batch_size == 2
    with pytest.raises(ValueError, match="batch_size must be an int >= 1 or None"):
        CalibrationConfig(batch_size=0).validate()


# ============================================================================ memory estimate
def test_memory_estimate_exact_for_small_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    mcfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    c = CalibrationConfig(num_samples=4, sequence_length=8, batch_size=2)
    est = estimate_memory(mcfg, c)
    layer = LlamaForCausalLM(mcfg).model.layers[0]
    assert est.layer_weights == sum(p.numel() for p in layer.parameters()) * 4
    # Hessians: q, k, v, o, gate, up read 64 features, down reads 128; fp32
    assert est.hessians == (6 * 64 * 64 + 128 * 128) * 4 and est.observed_linears == 7
    assert est.solver_workspace == 128 * 128 * 4
    assert est.host_activations == 2 * 4 * 8 * 64 * 4
    assert est.embeddings == 2 * 100 * 64 * 4
    T = 2 * 8
    assert est.activations == (3 * T * 64 + T * (64 + 2 * 32) + T * 64 + T * 128 * 3) * 4
    assert est.peak_device == est.layer_weights + est.activations + est.hessians + est.solver_workspace
    # fp64 Hessians double; eager attention adds the scores; bf16 activations halve
    est64 = estimate_memory(mcfg, c, hessian_dtype=torch.float64)
    assert est64.hessians == 2 * est.hessians
    eager = estimate_memory(mcfg, c, attn_implementation="eager")
    assert eager.attention_scores == 2 * 2 * 4 * 8 * 8 * 4
    assert eager.activations == est.activations + eager.attention_scores
    assert estimate_memory(mcfg, c, dtype=torch.bfloat16).host_activations == est.host_activations // 2
    text = str(est)
    for row in (
        "one layer's weights",
        "Hessians (7 Linear, float32)",
        "peak device memory",
        "host: all layer inputs+outputs",
        "4 samples x 8 tokens, batch 2",
    ):
        assert row in text
    with pytest.raises(ValueError, match="unknown observer"):
        estimate_memory(mcfg, c, observers=("hessian", "magic"))


def test_memory_estimate_moe_counts_experts():
    from transformers import MixtralConfig, MixtralForCausalLM

    mcfg = MixtralConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        vocab_size=50,
        max_position_embeddings=64,
    )
    est = estimate_memory(mcfg, CalibrationConfig(num_samples=2, sequence_length=8))
    layer = MixtralForCausalLM(mcfg).model.layers[0]
    assert est.layer_weights == sum(p.numel() for p in layer.parameters()) * 4
    # q, k, v, o (4) + per expert: fused gate_up (reads 32) and down (reads 48)
    assert est.observed_linears == 4 + 2 * 4
    assert est.hessians == (4 * 32 * 32 + 4 * (32 * 32 + 48 * 48)) * 4
    assert "MoE: 4 experts, top-2" in str(est)


# ============================================================================ hub sets (local fixtures)
@pytest.fixture
def hub_fixture(tmp_path, monkeypatch):
    """Replace the one function that calls datasets.load_dataset with a reader of local rows."""
    rows_by_path = {
        "allenai/c4": [{"text": f"c4 document {i}", "url": "x"} for i in range(10)],
        "Salesforce/wikitext": [
            {"text": t}
            for t in [
                "",
                " = Alpha = \n",
                "",
                " alpha body one \n",
                " = = Sub = = \n",
                " alpha body two \n",
                " = Beta = \n",
                " beta body \n",
                "",
            ]
        ],
        "bigcode/the-stack-smol": [{"content": "def f():\n    return 1\n", "lang": "Python"}],
        "text": [{"text": "para one"}, {"text": "para two"}],
    }
    calls = []

    def fake(spec, split, revision):
        calls.append((spec.name, split, revision))
        return iter(rows_by_path[spec.path])

    monkeypatch.setattr(hub_mod, "_load_rows", fake)
    return calls


def test_hub_sets_load_through_the_loader(hub_fixture):
    c4 = CalibrationDataset.from_hub("c4", limit=3)
    assert c4.samples == ("c4 document 0", "c4 document 1", "c4 document 2")
    assert c4.name == "c4" and "allenai/c4" in c4.source and c4.version.startswith("sha256:")
    wiki = CalibrationDataset.from_source("wikitext-2")
    assert wiki.samples == (" = Alpha =\n alpha body one\n = = Sub = =\n alpha body two", " = Beta =\n beta body")
    stack = CalibrationDataset.from_hub("the-stack")
    assert stack.samples == ("def f():\n    return 1\n",)
    assert CalibrationDataset.from_hub("bartowski-v3", split="train", revision="abc").samples == (
        "para one",
        "para two",
    )
    assert hub_fixture[-1] == ("bartowski-v3", "train", "abc")
    with pytest.raises(ValueError, match="unknown hub set 'pile'"):
        CalibrationDataset.from_hub("pile")


def test_hub_loader_passes_the_right_arguments(monkeypatch):
    """The real _load_rows against a stand-in `datasets` module: checks what would be requested."""
    import types

    seen = {}

    def load_dataset(path, **kw):
        seen[path] = kw
        return [{"text": "row"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    for name in ("c4", "wikitext2", "bartowski-v3", "the-stack"):
        if name == "the-stack":
            with pytest.raises(ValueError, match="row 0 has no 'content' field"):
                CalibrationDataset.from_hub(name)
        else:
            assert CalibrationDataset.from_hub(name).samples == ("row",)
    assert seen["allenai/c4"] == dict(split="train", streaming=True, data_files="en/c4-train.00000-of-01024.json.gz")
    assert seen["Salesforce/wikitext"] == dict(split="train", streaming=False, name="wikitext-2-raw-v1")
    assert seen["text"]["sample_by"] == "paragraph" and "calibration_datav3.txt" in seen["text"]["data_files"]
    assert seen["bigcode/the-stack-smol"]["data_dir"] == "data/python"


def test_hub_offline_and_missing_library_errors(monkeypatch):
    def offline(spec, split, revision):
        raise ConnectionError("Couldn't reach 'allenai/c4' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(hub_mod, "_load_rows", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnavailableError) as e:
        CalibrationDataset.from_hub("c4")
    msg = str(e.value)
    for part in (
        "cannot load hub set 'c4'",
        "ConnectionError",
        "HF_HUB_OFFLINE",
        "dataset='builtin'",
        ".jsonl",
        ".txt",
    ):
        assert part in msg
    with pytest.raises(HubUnavailableError, match="gated"):
        CalibrationDataset.from_hub("the-stack")
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(HubUnavailableError, match=r"not installed.*pip install calibra\[hub\].*builtin"):
        CalibrationDataset.from_hub("wikitext2")


# ============================================================================ recommendations
def test_recommended_samples():
    assert [
        recommended_samples(n)
        for n in (
            5_000_000,
            99_999_999,
            100_000_000,
            500_000_000,
            1_000_000_000,
            8_000_000_000,
            15_000_000_000,
            70_000_000_000,
        )
    ] == [32, 32, 64, 64, 128, 128, 256, 256]
    for bad in (0, -5, 1.5, True):
        with pytest.raises(ValueError, match="num_parameters"):
            recommended_samples(bad)


# ============================================================================ builtin
def test_builtin_texts_tokenize_deterministically():
    ds = CalibrationDataset.builtin()
    assert len(ds) > 100 and ds.name == "builtin"
    # a word-level vocabulary over the built-in texts themselves: no [UNK], exact counts
    vocab = dict(SPECIALS)
    pre = pre_tokenizers.Whitespace()
    for t in ds.texts():
        for w, _ in pre.pre_tokenize_str(t):
            vocab.setdefault(w, len(vocab))
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", eos_token="[EOS]")
    c = cfg(num_samples=16, sequence_length=128, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = tokenize_calibration(ds, tok, c)
    assert a.token_count == 16 * 128 and a.num_samples == 16
    assert 0 not in a.input_ids.flatten().tolist()  # no unknown words
    assert a.fingerprint == tokenize_calibration(ds, tok, c).fingerprint


def test_builtin_model_tokenizer():
    from calibra import assets

    path = assets.ASSETS_DIR / "models" / "tiny-llama"
    if not (path / "config.json").is_file():
        pytest.skip("builtin:tiny-llama is not in this checkout yet")
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    mcfg = AutoConfig.from_pretrained(path, local_files_only=True)
    c = CalibrationConfig(num_samples=8, sequence_length=64, seed=0)
    data = tokenize_calibration(CalibrationDataset.builtin(), tok, c, max_positions=mcfg.max_position_embeddings)
    assert data.input_ids.shape == (8, 64) and data.token_count == 8 * 64
    assert int(data.input_ids.max()) < mcfg.vocab_size
    assert data.fingerprint == tokenize_calibration(CalibrationDataset.builtin(), tok, c).fingerprint


# ============================================================================ import floor
def test_importable_without_transformers_and_datasets():
    import os

    import calibra

    code = (
        "import sys; sys.modules['transformers'] = None; sys.modules['datasets'] = None\n"
        "import warnings; warnings.simplefilter('ignore')\n"
        "from calibra.data import CalibrationConfig, CalibrationDataset\n"
        "CalibrationConfig().validate(); print(len(CalibrationDataset.builtin()))"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(calibra.__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.strip()) > 100
