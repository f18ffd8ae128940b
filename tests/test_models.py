"""The builtin model and tokenizer, and the scalar head's padding invariance."""

import json

import torch

from rlhf.config import ModelConfig
from rlhf.data.builtin_sort import ALPHABET
from rlhf.data.tokenize import collate_sequences, encode, encode_response
from rlhf.models.builtin import save_builtin
from rlhf.models.loading import (ScalarHeadModel, last_token_index, load_causal_lm,
                                 load_tokenizer, position_ids_from)


def _tiny(tmp_path):
    return save_builtin(ModelConfig(n_layer=2, n_embd=32, n_head=2), ALPHABET, tmp_path / "base")


def test_builtin_model_loads_like_any_hf_model(tmp_path):
    path = _tiny(tmp_path)
    assert (path / "model.safetensors").exists()
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path)
    ids = encode(tokenizer, "31415=")
    assert tokenizer.decode(ids) == "31415="
    assert len(ids) == 6 and tokenizer.pad_token_id != tokenizer.eos_token_id
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, 6, len(tokenizer))


def test_position_ids_and_last_index_ignore_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids_from(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]
    assert last_token_index(mask).tolist() == [4, 2]


def test_reward_score_does_not_depend_on_padding(tmp_path):
    path = _tiny(tmp_path)
    tokenizer = load_tokenizer(path)
    model = ScalarHeadModel.from_causal_lm(path).eval()
    sequences = [encode_response(tokenizer, "31415=", "11345"),
                 encode_response(tokenizer, "12=", "12"),
                 encode_response(tokenizer, "9876543=", "3456789")]
    with torch.no_grad():
        alone = torch.cat([model.score(*collate_sequences([s], tokenizer.pad_token_id))
                           for s in sequences])
        right = model.score(*collate_sequences(sequences, tokenizer.pad_token_id, "right"))
        left = model.score(*collate_sequences(sequences, tokenizer.pad_token_id, "left"))
        # The same left-padded batch with 7 more pad columns in front.
        ids, mask = collate_sequences(sequences, tokenizer.pad_token_id, "left")
        pad_more = torch.full((3, 7), tokenizer.pad_token_id)
        wide = model.score(torch.cat([pad_more, ids], 1),
                           torch.cat([torch.zeros_like(pad_more), mask], 1))
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(wide, alone, atol=1e-5, rtol=1e-5)


def test_scalar_head_round_trips_as_a_seq_cls_checkpoint(tmp_path):
    path = _tiny(tmp_path)
    model = ScalarHeadModel.from_causal_lm(path).eval()
    with torch.no_grad():
        model.head.bias += 0.7
    model.score_std = 2.5
    model.save(tmp_path / "rm")
    loaded = ScalarHeadModel.load(tmp_path / "rm").eval()
    ids = torch.tensor([[4, 5, 6, 13, 1]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask), model(ids, mask))
    assert loaded.score_std == 2.5
    assert json.loads((tmp_path / "rm" / "config.json").read_text())["rlhf_score_bias"] == (
        model.head.bias.item())
