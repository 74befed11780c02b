"""Stage 1 (SFT) on the tiny assets: it learns, saves in HF format, trains on response
tokens only, and names the file and line of bad data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cluster.shared.config_file import load_config
from cluster.shared.errors import UserError
from cluster.shared.tokens import prompt_token_ids, response_token_ids
from learner.data import (
    DataError,
    collate_demonstrations,
    encode_demonstrations,
    read_demonstrations,
)
from learner.sft import run_sft
from learner.training import demonstration_nll
from tests.support import lm_head_outputs


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


@torch.no_grad()
def mean_nll(model, tokenizer, rows) -> float:
    examples = encode_demonstrations(tokenizer, rows, 64)
    ids, attention, loss_mask = collate_demonstrations(examples, tokenizer.pad_token_id)
    return float(demonstration_nll(model, ids, attention, loss_mask))


def test_sft_learns_the_demonstrations_and_saves_hf_format(tiny_assets, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lines = (tiny_assets.data / "sft.jsonl").read_text().splitlines()[:256]
    data = write_lines(tmp_path / "sft.jsonl", lines)
    output = tmp_path / "sft-out"
    cfg = load_config(
        None,
        [
            f"model.policy={tiny_assets.policy}",
            f"sft.data={data}",
            f"sft.output={output}",
            "sft.epochs=3",
            "sft.batch_size=16",
            "sft.learning_rate=0.003",
            "sft.max_length=64",
        ],
    )
    logged: list[str] = []
    assert run_sft(cfg, log=logged.append) == output

    rows = [json.loads(line) for line in lines[:64]]
    tokenizer = AutoTokenizer.from_pretrained(output)
    before = mean_nll(AutoModelForCausalLM.from_pretrained(tiny_assets.policy), tokenizer, rows)
    after = mean_nll(AutoModelForCausalLM.from_pretrained(output), tokenizer, rows)
    assert before > 6.0  # about ln(1024): a random model
    assert after < 0.5 * before, (before, after)
    # The saved tokenizer is the policy's, chat template and all.
    original = AutoTokenizer.from_pretrained(tiny_assets.policy)
    assert tokenizer.chat_template == original.chat_template
    assert tokenizer.eos_token_id == original.eos_token_id
    # Progress lines with the loss; the last one at the last of 3 x 16 steps.
    progress = [line for line in logged if " loss " in line]
    assert len(progress) >= 10 and "step 48/48" in progress[-1]
    assert not list(tmp_path.glob(".tmp-*"))


def test_sft_loss_covers_response_tokens_only(tiny_assets):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets.policy)
    model = AutoModelForCausalLM.from_pretrained(tiny_assets.policy)
    rows = [
        {"prompt": "Where does Anna live?", "response": "Anna lives in Oslo."},
        {"prompt": "Answer in one word: what is the favourite colour of Bo?", "response": "Blue."},
    ]
    examples = encode_demonstrations(tokenizer, rows, 64)
    for example, row in zip(examples, rows):
        prompt = prompt_token_ids(tokenizer, row["prompt"])
        assert example.input_ids == prompt + response_token_ids(tokenizer, row["response"])
        assert example.prompt_length == len(prompt)
        assert example.input_ids[-1] == tokenizer.eos_token_id
    ids, attention, loss_mask = collate_demonstrations(examples, tokenizer.pad_token_id)

    with lm_head_outputs(model) as captured:
        loss = demonstration_nll(model, ids, attention, loss_mask)
        loss.backward()

    # The loss is the mean NLL of the response tokens (EOS included) under the full model.
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=attention).logits[:, :-1], -1)
    token_logp = logp.gather(-1, ids[:, 1:, None])[..., 0]
    expected = -(token_logp * loss_mask).sum() / loss_mask.sum()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert loss_mask.sum() == sum(len(e.input_ids) - e.prompt_length for e in examples)

    (logits,) = captured  # the window of positions from the earliest response token
    offset = ids.shape[1] - logits.shape[1]
    touched = logits.grad.abs().sum(-1)[:, :-1] > 0
    assert torch.equal(touched, loss_mask[:, offset:].bool())
    assert offset > 0 and not loss_mask[:, :offset].any()


def test_bad_data_lines_name_the_file_and_line(tiny_assets, tmp_path):
    good = json.dumps({"prompt": "Hi?", "response": "Hello."})
    cases = {
        "bad_json.jsonl": ([good, "", '{"prompt": "x", '], ":3: not valid JSON"),
        "missing.jsonl": ([good, json.dumps({"prompt": "x"})], ":2: missing field 'response'"),
        "not_string.jsonl": (
            [json.dumps({"prompt": 3, "response": "y"})],
            ":1: field 'prompt' must be a string, got int",
        ),
        "not_object.jsonl": ([good, good, "[1, 2]"], ":3: expected a JSON object"),
    }
    for name, (lines, message) in cases.items():
        path = write_lines(tmp_path / name, lines)
        with pytest.raises(DataError) as err:
            read_demonstrations(path)
        assert str(err.value).startswith(str(path)) and message in str(err.value), str(err.value)
    latin1 = '{"prompt": "caf\xe9", "response": "x"}'.encode("latin-1")
    (tmp_path / "latin1.jsonl").write_bytes(good.encode() + b"\n" + latin1 + b"\n")
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not valid UTF-8"):
        read_demonstrations(tmp_path / "latin1.jsonl")
    assert issubclass(DataError, UserError) and issubclass(DataError, ValueError)  # exit code 2
    with pytest.raises(DataError, match="not found"):
        read_demonstrations(tmp_path / "nope.jsonl")

    # The SFT entry point surfaces the same error (the CLI maps it to exit code 2).
    cfg = load_config(
        None,
        [
            f"model.policy={tiny_assets.policy}",
            f"sft.data={tmp_path / 'missing.jsonl'}",
            f"sft.output={tmp_path / 'out'}",
        ],
    )
    with pytest.raises(DataError, match=r"missing\.jsonl:2"):
        run_sft(cfg, log=lambda _: None)
    assert not (tmp_path / "out").exists()


def test_a_dataset_folder_reads_its_train_files(tmp_path):
    folder = tmp_path / "dataset" / "data"
    folder.mkdir(parents=True)
    write_lines(folder / "train-00000.jsonl", [json.dumps({"prompt": "a", "response": "b"})])
    write_lines(folder / "train-00001.jsonl", [json.dumps({"prompt": "c", "response": "d"})])
    write_lines(folder / "test.jsonl", [json.dumps({"prompt": "e", "response": "f"})])
    rows = read_demonstrations(tmp_path / "dataset")
    assert rows == [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no \\*.jsonl files"):
        read_demonstrations(tmp_path / "empty")


def test_dropout_stays_off_in_train_mode(tiny_assets, tmp_path):
    """`disable_dropout` (SFT, the learner's models, reward models): eval mode, and every rate
    zeroed, so that train mode (gradient checkpointing, reward-model training) keeps it off:
    `nn.Dropout`, the float rates layers copy from the config, and the config's own."""
    import shutil

    from transformers import AutoModelForCausalLM

    from cluster.shared.precision import disable_dropout

    folder = tmp_path / "policy"
    shutil.copytree(tiny_assets.policy, folder)
    config = json.loads((folder / "config.json").read_text())
    config["attention_dropout"] = 0.5
    (folder / "config.json").write_text(json.dumps(config))
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.model.layers[0].extra = torch.nn.Dropout(0.5)  # a layer's own dropout module
    model.model.layers[0].resid_dropout = 0.25  # and a rate under another name
    disable_dropout(model)
    assert not model.training and model.config.attention_dropout == 0.0
    assert model.model.layers[0].extra.p == 0.0 and model.model.layers[0].resid_dropout == 0.0
    assert all(layer.self_attn.attention_dropout == 0.0 for layer in model.model.layers)
    model.train()
    x = torch.tensor([[5, 6, 7, 8, 9, 1]])
    assert torch.equal(model(x).logits, model(x).logits)
