"""The grammar mask: llguidance's packed bitmask read back as one boolean per token, exactly."""

from __future__ import annotations

import torch

from peftray.serve.grammar import _unpack


def _reference(words: torch.Tensor, n: int) -> torch.Tensor:
    """Bit j of word i is token 32 i + j, read one token at a time; tokens past the words are forbidden."""
    flat = [bool((int(w) >> j) & 1) for w in words.tolist() for j in range(32)]
    return torch.tensor((flat + [False] * n)[:n])


def test_unpack_matches_the_bit_by_bit_reading():
    g = torch.Generator().manual_seed(0)
    for vocab, n in [(512, 512), (500, 500), (512, 530), (32000, 32000), (33, 33)]:
        words = torch.randint(-2**31, 2**31 - 1, ((vocab + 31) // 32,), dtype=torch.int64, generator=g)
        words = words.to(torch.int32)
        words[0] = -1  # every bit set, the sign bit included
        got = _unpack(words, n)
        assert got.dtype == torch.bool and got.shape == (n,)
        assert torch.equal(got, _reference(words, n)), (vocab, n)


def test_unpack_reads_a_row_of_a_batch_bitmask():
    words = torch.tensor([[0, 0], [1 - 2**31, 1 << 3]], dtype=torch.int32)  # bits 0 and 31; bit 3
    got = _unpack(words[1], 64)
    assert got.nonzero().flatten().tolist() == [0, 31, 35]


def test_mask_rows_forbids_exactly_what_each_matcher_forbids(tmp_path):
    """A batch of matchers at different points of the same schema: each row's mask is its own matcher's."""
    import llguidance.torch as lt
    from transformers import AutoTokenizer

    from peftray.base_models import make_tiny_llama
    from peftray.serve.grammar import GrammarCompiler, mask_rows

    tok = AutoTokenizer.from_pretrained(make_tiny_llama(tmp_path / "tiny"))
    vocab = len(tok)
    compiler = GrammarCompiler(tok, vocab)
    schema = {"type": "object", "required": ["a"], "properties": {"a": {"type": "integer"}}}
    grammars = [compiler.matcher(schema) for _ in range(3)]
    for t in tok.encode('{"a"', add_special_tokens=False):  # row 1 is inside the object, row 2 after its key
        grammars[1].accept(t)
        grammars[2].accept(t)
    for t in tok.encode(':', add_special_tokens=False):
        grammars[2].accept(t)
    logits = torch.randn(3, vocab + 7)  # model vocabularies can be larger than the tokenizer's
    got = mask_rows(grammars, logits)
    for i, g in enumerate(grammars):
        bits = lt.allocate_token_bitmask(1, vocab)
        lt.fill_next_token_bitmask(g.m, bits, 0)
        allowed = _reference(bits[0], vocab + 7)
        assert torch.equal(got[i][allowed], logits[i][allowed])
        assert torch.isneginf(got[i][~allowed]).all() and not allowed[vocab:].any()
        assert 0 < int(allowed.sum()) < vocab  # the grammar allows something and forbids something
    assert not torch.equal(got[0].isinf(), got[2].isinf())  # rows at different points get different masks
