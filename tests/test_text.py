import pytest
import torch
from transformers import CLIPTokenizer

from perco.models.text import NullTextEmbedding, check_tokenizer, drop_captions, encode_captions
from perco.testing import clip_tokenizer, tiny_components


def test_clip_tokenizer_is_the_real_vocabulary():
    tok = clip_tokenizer()
    assert len(tok) == 49408 and tok.model_max_length == 77
    ids = tok("a photo of a cat").input_ids
    # CLIP's ids: <|startoftext|> a photo of a cat <|endoftext|>
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_check_tokenizer_rejects_a_vocabulary_less_tokenizer():
    broken = CLIPTokenizer(vocab={"<|startoftext|>": 0, "<|endoftext|>": 1}, merges=[])
    with pytest.raises(RuntimeError, match="vocabulary files are missing"):
        check_tokenizer(broken, "stabilityai/stable-diffusion-2-1")
    check_tokenizer(clip_tokenizer(), "ok")


def test_encode_captions_pads_to_the_model_length():
    c = tiny_components()
    emb = encode_captions(c["tokenizer"], c["text_encoder"], ["a red barn", ""])
    assert emb.shape == (2, 77, 32)
    assert not torch.allclose(emb[0], emb[1])


def test_null_embedding_learned_or_fixed(tmp_path):
    learned = NullTextEmbedding(sequence_length=5, dim=3, learned=True)
    fixed = NullTextEmbedding(sequence_length=5, dim=3, learned=False)
    value = torch.randn(1, 5, 3)
    for m in (learned, fixed):
        m.initialise(value)
        torch.testing.assert_close(m(4), value.expand(4, -1, -1))
    assert [n for n, _ in learned.named_parameters()] == ["embedding"]
    assert list(fixed.parameters()) == [] and "embedding" in fixed.state_dict()
    fixed.save_pretrained(tmp_path)
    torch.testing.assert_close(NullTextEmbedding.from_pretrained(tmp_path)(1), value)


def test_drop_captions_replaces_about_ten_percent():
    text, null = torch.ones(2000, 2, 3), torch.zeros(1, 2, 3)
    out = drop_captions(text, null, 0.1, torch.Generator().manual_seed(0))
    dropped = (out[:, 0, 0] == 0).float().mean().item()
    assert 0.08 < dropped < 0.12
    assert torch.all((out == 0).all(dim=(1, 2)) | (out == 1).all(dim=(1, 2)))  # whole samples
