"""Any Hugging Face causal LM: tiny random GPT-2, Llama, Qwen2 and GPT-NeoX models.

Each gets a byte-level BPE tokenizer trained here with `tokenizers` (300 tokens, on the test
texts) and a chat template in its family's style, wrapped as a PreTrainedTokenizerFast and
saved with the model by `save_pretrained`, so the stages load them by path exactly as they
would load a hub model. The tokenizers differ the way real ones do: GPT-2's and Llama's have
no pad token, Qwen2's ends chat turns with `<|im_end|>` as EOS and pads with `<|endoftext|>`.

The whole pipeline (prepare -> sft -> reward -> reference -> ppo -> evaluate) runs through the
same stage functions on every architecture with LoRA off and on, and on every data format.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf import stages
from rlhf.config import ModelConfig, load_params
from rlhf.errors import ParamsError, UserError
from rlhf.paths import Paths

from .conftest import REPO, TINY_OVERRIDES

SIMPLE_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }}"
    " [/INST]{% elif m['role'] == 'system' %}<<SYS>>{{ m['content'] }}<</SYS>>"
    "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Per architecture: the tokenizer's special tokens and template, and its tiny config.
ARCHITECTURES = {
    "gpt2": dict(specials={"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                           "unk_token": "<|endoftext|>"},
                 template=SIMPLE_TEMPLATE, lora_targets=["c_attn"]),
    "llama": dict(specials={"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
                  template=LLAMA_TEMPLATE, lora_targets=["q_proj", "v_proj"]),
    "qwen2": dict(specials={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
                  extra=["<|im_start|>"], template=CHATML_TEMPLATE,
                  lora_targets=["q_proj", "v_proj"]),
    "gpt_neox": dict(specials={"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                               "pad_token": "<|padding|>"},
                     template=SIMPLE_TEMPLATE, lora_targets=["query_key_value"]),
}


def tiny_config(arch: str, vocab_size: int, tokenizer=None):
    """A 32-wide, 1-2 layer random config of `arch` (also bloom and opt, for padding tests)."""
    import transformers as tf

    ids = {}
    if tokenizer is not None:
        ids = dict(bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None
                   else tokenizer.eos_token_id,
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    common = dict(vocab_size=vocab_size, **ids)
    rope = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                max_position_embeddings=256, **common)
    if arch == "gpt2":
        return tf.GPT2Config(n_positions=256, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                             embd_pdrop=0.0, attn_pdrop=0.0, **common)
    if arch == "llama":
        return tf.LlamaConfig(num_hidden_layers=2, num_key_value_heads=1,
                              tie_word_embeddings=False, **rope)
    if arch == "qwen2":
        return tf.Qwen2Config(num_hidden_layers=1, num_key_value_heads=2,
                              tie_word_embeddings=True, **rope)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(num_hidden_layers=1, rotary_pct=0.5, hidden_dropout=0.0,
                                attention_dropout=0.0, **rope)
    if arch == "bloom":
        return tf.BloomConfig(hidden_size=32, n_layer=2, n_head=2, **common)
    if arch == "opt":
        return tf.OPTConfig(hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                            num_attention_heads=2, max_position_embeddings=256,
                            word_embed_proj_dim=32, dropout=0.0, **common)
    if arch == "olmo":
        return tf.OlmoConfig(num_hidden_layers=1, **rope)
    raise ValueError(arch)


# --- data in every format ----------------------------------------------------------------

N_ROWS = 40  # 36 train pairs / 4 held out: above the tiny batch sizes (32 SFT, 32 RM, 16 PPO)


def rows_for(fmt: str) -> list[dict]:
    rows = []
    for i in range(N_ROWS):
        a, b = i % 8, i // 8
        good, bad = str(a + b), str(a + b + 1)
        if fmt == "explicit":
            rows.append({"prompt": f"{a}+{b}=", "chosen": f" {good}", "rejected": f" {bad}"})
        elif fmt == "hh":
            rows.append({"chosen": f"\n\nHuman: {a}+{b}?\n\nAssistant: {good}",
                         "rejected": f"\n\nHuman: {a}+{b}?\n\nAssistant: {bad}"})
        elif fmt == "conversational":
            rows.append({"prompt": [{"role": "user", "content": f"{a}+{b}?"}],
                         "chosen": [{"role": "assistant", "content": good}],
                         "rejected": [{"role": "assistant", "content": bad}]})
        elif fmt == "tldr":
            choice = i % 2
            summaries = [{"text": f" {good}"}, {"text": f" {bad}"}]
            rows.append({"info": {"post": f"add {a} and {b}", "title": f"sum {i}",
                                  "subreddit": "math"},
                         "summaries": summaries if choice == 0 else summaries[::-1],
                         "choice": choice})
    return rows


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return [text for item in items for text in _strings(item)]


def corpus() -> list[str]:
    """The texts the tokenizers are trained on: every string of every format's rows, and the
    words the chat templates and the tldr prompt add."""
    texts = [text for fmt in ("explicit", "hh", "conversational", "tldr")
             for row in rows_for(fmt) for text in _strings(row)]
    return texts + ["user: assistant: [INST] [/INST] SUBREDDIT: r/math\n\nTITLE: POST: TL;DR:"] * 5


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    files = {}
    for fmt in ("explicit", "hh", "conversational", "tldr"):
        files[fmt] = root / f"{fmt}.jsonl"
        files[fmt].write_text("".join(json.dumps(row) + "\n" for row in rows_for(fmt)))
    return files


# --- models ------------------------------------------------------------------------------

def build_tokenizer(arch: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = ARCHITECTURES[arch]
    specials = list(dict.fromkeys([*spec["specials"].values(), *spec.get("extra", [])]))
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, **spec["specials"],
                                        additional_special_tokens=spec.get("extra", []))
    tokenizer.chat_template = spec["template"]
    return tokenizer


def save_tiny_model(arch: str, out: Path) -> Path:
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer(arch)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer), tokenizer))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: save_tiny_model(arch, root / arch) for arch in ARCHITECTURES}


def run_pipeline(root: Path, model_dir: Path, source: Path, *overrides: str):
    params = load_params(REPO / "params.yaml", TINY_OVERRIDES + [
        f"data.source={source}", f"model.name_or_path={model_dir}", *overrides])
    paths = Paths(root)
    results = {name: stages.get(name)(params, paths) for name in stages.COMPUTE_STAGES}
    return params, paths, results


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def assert_plain_hf_model(directory: Path, arch: str) -> None:
    """A plain Hugging Face model: config + safetensors, no adapter files, loads by class."""
    from transformers import AutoModelForCausalLM

    names = {p.name for p in directory.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names, names
    assert not {n for n in names if n.startswith("adapter_")}, names
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == arch and config.get("use_cache", True) is not False
    model = AutoModelForCausalLM.from_pretrained(directory, use_safetensors=True)
    assert not any("lora" in name for name, _ in model.named_parameters())


def changed_tensors(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


def only_lora_targets(names: set[str], targets: list[str]) -> bool:
    return bool(names) and all(any(f".{t}." in f".{n}" for t in targets) for n in names)


# --- the pipeline on every architecture, LoRA off and on ---------------------------------

PIPELINES = [
    ("gpt2", False, []),
    ("gpt2", True, ["train.precision=bf16"]),  # bf16 autocast (on CPU here)
    ("llama", False, []),
    ("llama", True, ["model.gradient_checkpointing=true"]),
    ("qwen2", False, ["model.gradient_checkpointing=true"]),
    ("qwen2", True, ["ppo.value_model=policy_head", "model.lora_r=4", "model.lora_alpha=8"]),
    ("gpt_neox", False, []),
    ("gpt_neox", True, ["model.lora_dropout=0.1", "ppo.ptx_coef=0.1"]),
]


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one state per process, fixed at its first mixed-precision setting."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("arch, use_lora, extra", PIPELINES,
                         ids=[f"{a}-lora_{'on' if on else 'off'}" for a, on, _ in PIPELINES])
def test_pipeline_on_each_architecture(tmp_path, model_dirs, data_files, arch, use_lora, extra,
                                       fresh_accelerate_state):
    params, paths, results = run_pipeline(
        tmp_path, model_dirs[arch], data_files["explicit"], f"model.lora={str(use_lora).lower()}",
        *extra)
    assert results["sft"]["sft/loss_final"] < results["sft"]["sft/loss_first"]
    assert 0.0 <= results["reward"]["reward/accuracy"] <= 1.0
    assert all(torch.isfinite(torch.tensor(v)) for v in results["ppo"].values())
    report = json.loads(paths.metrics_file("eval").read_text())
    assert report["n_prompts"] == 4
    for name in ("policy", "reference"):
        assert torch.isfinite(torch.tensor([report[name]["rm_score"], report[name]["kl"]])).all()
    assert report["reference"]["kl"] == pytest.approx(0.0, abs=1e-4)

    # Every stage wrote plain models, whatever was trained.
    for directory in (paths.sft, paths.policy):
        assert_plain_hf_model(directory, arch)
    assert len(json.loads((paths.reward / "config.json").read_text())["id2label"]) == 1
    assert not list(paths.reward.glob("adapter_*"))
    base, sft, policy = weights(model_dirs[arch]), weights(paths.sft), weights(paths.policy)
    targets = ARCHITECTURES[arch]["lora_targets"]
    if use_lora:
        # Adapters were merged into exactly the modules peft adapts for this architecture.
        assert only_lora_targets(changed_tensors(base, sft), targets)
        assert only_lora_targets(changed_tensors(sft, policy), targets)
        # The reward model's trunk keys carry the same prefix as the causal LM's; its
        # embedding may have grown by an added pad token's row (cut off here).
        reward_trunk = {k: v[:sft[k].shape[0]] for k, v in weights(paths.reward).items()
                        if k != "score.weight"}
        assert reward_trunk.keys() <= sft.keys()
        sft_trunk = {k: sft[k] for k in reward_trunk}
        assert only_lora_targets(changed_tensors(sft_trunk, reward_trunk), targets)
    else:
        assert not only_lora_targets(changed_tensors(base, sft), targets)  # all weights trained


# --- every data format on one architecture -----------------------------------------------

@pytest.mark.parametrize("use_lora", [False, True], ids=["lora_off", "lora_on"])
@pytest.mark.parametrize("fmt", ["hh", "conversational", "tldr"])  # explicit: above
def test_pipeline_on_each_format(tmp_path, model_dirs, data_files, fmt, use_lora):
    params, paths, results = run_pipeline(tmp_path, model_dirs["qwen2"], data_files[fmt],
                                          f"model.lora={str(use_lora).lower()}")
    manifest = json.loads((paths.prepared / "manifest.json").read_text())
    assert manifest["format"] == fmt and manifest["rows_kept"] == N_ROWS
    report = json.loads(paths.metrics_file("eval").read_text())
    assert report["n_prompts"] == 4 and "rm_score" in report["policy"]
    assert_plain_hf_model(paths.policy, "qwen2")
    if fmt == "conversational":
        # Prompts were rendered by the model's own chat template, generation prompt included.
        from rlhf.models.loading import load_tokenizer

        tokenizer = load_tokenizer(model_dirs["qwen2"])
        prompts = [json.loads(line)["prompt"]
                   for line in (paths.prepared / "rl_prompts.jsonl").read_text().splitlines()]
        user = prompts[0].split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
        assert prompts[0] == tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
        assert prompts[0].endswith("<|im_start|>assistant\n")


# --- tokenizers and loading --------------------------------------------------------------

@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_tokenizer_round_trips_and_gets_a_pad_token(model_dirs, arch):
    from rlhf.data.tokenize import encode
    from rlhf.models.loading import load_tokenizer

    tokenizer = load_tokenizer(model_dirs[arch])
    assert tokenizer.padding_side == "left"
    assert len(tokenizer) <= 300
    if "pad_token" in ARCHITECTURES[arch]["specials"]:
        assert tokenizer.pad_token == ARCHITECTURES[arch]["specials"]["pad_token"]
        assert tokenizer.pad_token_id != tokenizer.eos_token_id
    else:
        assert tokenizer.pad_token_id == tokenizer.eos_token_id  # none of its own: EOS pads
    for text in ("3+4=", "\n\nHuman: 2+2?\n\nAssistant: 4", "TL;DR: sum é"):
        assert tokenizer.decode(encode(tokenizer, text)) == text
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "1+1?"}],
                                             tokenize=False, add_generation_prompt=True)
    assert "1+1?" in rendered


def test_a_tokenizer_without_eos_is_refused(tmp_path, model_dirs):
    from transformers import AutoTokenizer

    from rlhf.models.loading import load_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dirs["gpt2"])
    tokenizer.eos_token = None
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="has no EOS token"):
        load_tokenizer(tmp_path)


def test_loading_passes_trust_remote_code_and_safetensors_only(tmp_path, model_dirs, monkeypatch):
    """Every from_pretrained gets trust_remote_code as configured (false by default) and
    weights come from safetensors only: a pickled .bin checkpoint is refused."""
    import transformers

    from rlhf.models.loading import ScalarHeadModel, load_causal_lm, load_tokenizer

    calls = []
    for cls in (transformers.AutoModel, transformers.AutoModelForCausalLM,
                transformers.AutoTokenizer):
        real = cls.from_pretrained.__func__

        def spy(klass, *args, _real=real, **kwargs):
            calls.append((klass.__name__, kwargs))
            return _real(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    path = model_dirs["llama"]
    load_tokenizer(path)
    load_causal_lm(path)
    ScalarHeadModel.from_causal_lm(path)
    assert [name for name, _ in calls] == ["AutoTokenizer", "AutoModelForCausalLM", "AutoModel"]
    assert all(kwargs["trust_remote_code"] is False for _, kwargs in calls)
    assert all(kwargs["use_safetensors"] is True for name, kwargs in calls if name != "AutoTokenizer")
    monkeypatch.undo()

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"cannot load the model at .*safetensors"):
        load_causal_lm(pickled)


def test_a_model_with_its_own_code_is_refused_without_running_it(tmp_path):
    from rlhf.models.loading import load_causal_lm

    marker = tmp_path / "code_ran"
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "custom", "architectures": ["CustomForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                     "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}}))
    for name in ("configuration_custom.py", "modeling_custom.py"):
        (tmp_path / name).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(UserError, match="needs its own Python code.*model.trust_remote_code=true"):
        load_causal_lm(tmp_path)
    assert not marker.exists()


def test_weights_load_in_float32_whatever_they_were_saved_in(tmp_path, model_dirs):
    from transformers import AutoModelForCausalLM

    from rlhf.models.loading import ScalarHeadModel, load_causal_lm

    AutoModelForCausalLM.from_pretrained(model_dirs["qwen2"]).to(torch.bfloat16).save_pretrained(
        tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_causal_lm(tmp_path).dtype == torch.float32
    assert ScalarHeadModel.from_causal_lm(tmp_path).trunk.dtype == torch.float32


# --- the reward model as a standard Hugging Face checkpoint -------------------------------

@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_reward_model_loads_as_a_standard_seq_cls_model(tmp_path, model_dirs, arch):
    """`AutoModelForSequenceClassification.from_pretrained(models/reward)` with the tokenizer
    saved beside it scores prompt + response + EOS like our ScalarHeadModel, up to the bias in
    its config, padded right (the default) or left (with position ids); `ScalarHeadModel.load`
    reads it back. GPT-2's and Llama's tokenizers pad with EOS and get a pad token of their
    own (HF's seq-cls models find the last token that is not the pad id); Qwen2's has one."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf.data.tokenize import collate_sequences, encode_response
    from rlhf.models.loading import ScalarHeadModel, load_tokenizer, position_ids_from

    tokenizer = load_tokenizer(model_dirs[arch])
    torch.manual_seed(0)
    model = ScalarHeadModel.from_causal_lm(model_dirs[arch]).eval()
    with torch.no_grad():
        model.head.bias.fill_(-0.3)
    model.score_std = 1.7
    model.save(tmp_path / "rm", tokenizer)
    assert not (tmp_path / "rm" / "score_head.safetensors").exists()
    assert tokenizer.padding_side == "left"  # the caller's tokenizer is untouched

    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "rm")
    hf_model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    config = hf_model.config
    assert config.architectures[0].endswith("ForSequenceClassification")
    assert config.num_labels == 1 and config.rlhf_score_bias == pytest.approx(-0.3)
    assert config.rlhf_score_std == 1.7
    assert config.pad_token_id == hf_tokenizer.pad_token_id != hf_tokenizer.eos_token_id
    assert hf_tokenizer.padding_side == "right"
    if arch == "qwen2":
        assert hf_tokenizer.pad_token == "<|endoftext|>"  # its own pad token is kept

    pairs = [("3+4=", " 7"), ("\n\nHuman: 1+2?\n\nAssistant:", " 3"), ("0+0=", " 0 1"),
             ("add 2 and 5", " 7")]
    with torch.no_grad():
        ours = model.score(*collate_sequences(
            [encode_response(tokenizer, p, r) for p, r in pairs], tokenizer.pad_token_id, "left"))
        batch = hf_tokenizer([p + r + hf_tokenizer.eos_token for p, r in pairs], padding=True,
                             add_special_tokens=False, return_tensors="pt")
        assert (batch["attention_mask"] == 0).any()  # some rows really are padded
        right = hf_model(**batch).logits[:, 0]
        ids, mask = collate_sequences([encode_response(hf_tokenizer, p, r) for p, r in pairs],
                                      hf_tokenizer.pad_token_id, "left")
        left = hf_model(input_ids=ids, attention_mask=mask,
                        position_ids=position_ids_from(mask)).logits[:, 0]
        loaded = ScalarHeadModel.load(tmp_path / "rm").eval()
        reloaded = loaded.score(*collate_sequences(
            [encode_response(tokenizer, p, r) for p, r in pairs], tokenizer.pad_token_id, "left"))
    torch.testing.assert_close(right + config.rlhf_score_bias, ours, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left + config.rlhf_score_bias, ours, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reloaded, ours, atol=1e-6, rtol=1e-6)
    assert loaded.score_std == 1.7


# --- pinned hub revisions ----------------------------------------------------------------

def test_revisions_reach_the_manifest_cache_keys_and_lineage(tmp_path, model_dirs, data_files):
    """model.revision / data.revision pin hub models and datasets (a local folder ignores a
    model revision; a local data file with one is a one-line error). They are recorded in the
    manifest and the model version's lineage tags, and the prepare and sft stages' dvc.yaml
    params (so the flow's cache keys) cover them."""
    from rlhf.data import sources
    from rlhf.errors import DataError
    from rlhf.mlops import dag
    from rlhf.mlops.register import lineage_tags

    params = load_params(REPO / "params.yaml", TINY_OVERRIDES + [
        f"data.source={data_files['explicit']}", f"model.name_or_path={model_dirs['gpt2']}",
        "model.revision=v1.0"])
    paths = Paths(tmp_path)
    stages.get("prepare")(params, paths)
    manifest = json.loads((paths.prepared / "manifest.json").read_text())
    assert manifest["tokenizer_revision"] == "v1.0" and manifest["revision"] is None
    assert lineage_tags(params, paths)["model.revision"] == "v1.0"
    assert "data.revision" not in lineage_tags(params, paths)

    with pytest.raises(DataError, match=r"data.revision \('abc'\) pins a hub dataset, but "
                                        r"data.source is the local path .*set data.revision to null$"):
        sources.load(str(data_files["explicit"]), "train", None, tmp_path, revision="abc")

    declared = dag.read(REPO)
    assert {"data", "model.revision"} <= set(declared["prepare"].params)
    assert "model" in declared["sft"].params


# --- padding invariance of scores and log-probs ------------------------------------------

def _layouts(sequences: list[list[int]], pad: int):
    """The same sequences padded right, left, and with extra padding on both sides."""
    from rlhf.data.tokenize import collate_sequences

    right = collate_sequences(sequences, pad, "right")
    left = collate_sequences(sequences, pad, "left")
    ids, mask = left
    n = len(sequences)
    wide = (torch.cat([torch.full((n, 3), pad), ids, torch.full((n, 2), pad)], 1),
            torch.cat([torch.zeros(n, 3, dtype=torch.long), mask,
                       torch.zeros(n, 2, dtype=torch.long)], 1))
    return {"right": right, "left": left, "wide": wide}


def _perturb_adapters(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2", "gpt_neox", "bloom", "opt"])
@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_scores_and_logprobs_do_not_depend_on_padding(arch, use_lora):
    """Reward/value scores at the last real token, and LM logits at real tokens, are the same
    for a sequence alone and in a batch padded left, right, or both; with or without LoRA, for
    architectures that take position ids (RoPE, learned) and ones that do not (ALiBi)."""
    from transformers import AutoModel, AutoModelForCausalLM

    from rlhf.models.lora import add_adapters
    from rlhf.models.loading import ScalarHeadModel, lm_logits, takes_position_ids

    torch.manual_seed(0)
    config = tiny_config(arch, 64)
    scorer = ScalarHeadModel(AutoModel.from_config(config))
    lm = AutoModelForCausalLM.from_config(config)
    assert takes_position_ids(lm) == (arch not in ("bloom",))
    if use_lora:
        cfg = ModelConfig(lora=True, lora_target_modules="all-linear" if arch == "opt" else None)
        scorer.trunk = add_adapters(scorer.trunk, cfg)
        lm = add_adapters(lm, cfg, "CAUSAL_LM")
        _perturb_adapters(scorer)
        _perturb_adapters(lm)
    scorer.eval(), lm.eval()
    sequences = [torch.randint(3, 64, (n,)).tolist() for n in (5, 9, 2, 7)]
    with torch.no_grad():
        alone = torch.cat([scorer.score(*_layouts([s], 0)["right"]) for s in sequences])
        alone_logits = [lm_logits(lm, *_layouts([s], 0)["right"])[0] for s in sequences]
        for layout, (ids, mask) in _layouts(sequences, 0).items():
            torch.testing.assert_close(scorer.score(ids, mask), alone, atol=1e-5, rtol=1e-4,
                                       msg=f"{arch} {layout}")
            logits = lm_logits(lm, ids, mask)
            for row, expected in enumerate(alone_logits):
                real = logits[row][mask[row].bool()]
                torch.testing.assert_close(real, expected, atol=1e-4, rtol=1e-4,
                                           msg=f"{arch} {layout}")


# --- LoRA --------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_lora_defaults_follow_peft_per_architecture(arch):
    from transformers import AutoModel, AutoModelForCausalLM

    from peft.tuners.lora import LoraLayer

    from rlhf.models.lora import add_adapters, default_target_modules, trainable_parameters

    assert default_target_modules(arch) == ARCHITECTURES[arch]["lora_targets"]
    config = tiny_config(arch, 64)
    for model, task in ((AutoModelForCausalLM.from_config(config), "CAUSAL_LM"),
                        (AutoModel.from_config(config), None)):
        total = sum(p.numel() for p in model.parameters())
        peft_model = add_adapters(model, ModelConfig(lora=True, lora_r=2, lora_alpha=4), task)
        adapted = {name.rsplit(".lora_A", 1)[0].rsplit(".", 1)[-1]
                   for name, _ in peft_model.named_parameters() if ".lora_A" in name}
        assert adapted == set(ARCHITECTURES[arch]["lora_targets"])
        trainable, everything = trainable_parameters(peft_model)
        assert everything - trainable == total  # the base is frozen, only adapters train
        assert all("lora_" in name for name, p in peft_model.named_parameters()
                   if p.requires_grad)
        lora_layer = next(m for m in peft_model.modules() if isinstance(m, LoraLayer))
        assert lora_layer.scaling["default"] == 2.0  # alpha / r


def test_lora_target_modules_param(tmp_path):
    from transformers import AutoModelForCausalLM

    from rlhf.models.lora import add_adapters

    model = AutoModelForCausalLM.from_config(tiny_config("llama", 64))
    chosen = add_adapters(model, ModelConfig(lora=True, lora_target_modules=["k_proj", "o_proj"]))
    assert {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in chosen.named_parameters()
            if ".lora_A" in n} == {"k_proj", "o_proj"}
    model = AutoModelForCausalLM.from_config(tiny_config("llama", 64))
    every = add_adapters(model, ModelConfig(lora=True, lora_target_modules="all-linear"))
    assert {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in every.named_parameters()
            if ".lora_A" in n} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                   "up_proj", "down_proj"}
    model = AutoModelForCausalLM.from_config(tiny_config("llama", 64))
    with pytest.raises(ParamsError, match=r"matches no module.*q_proj"):
        add_adapters(model, ModelConfig(lora=True, lora_target_modules=["c_attn"]))
    olmo = AutoModelForCausalLM.from_config(tiny_config("olmo", 64))
    with pytest.raises(ParamsError, match="no default target modules for model_type 'olmo'"):
        add_adapters(olmo, ModelConfig(lora=True))


@pytest.mark.parametrize("overrides, expected", [
    (["model.lora_r=0"], "greater than or equal to 1"),
    (["model.lora_alpha=0"], "greater than or equal to 1"),
    (["model.lora_dropout=1.0"], "less than 1"),
    (["model.lora_target_modules=[]"], "must name at least one module"),
    (["model.lora_target_modules=all"], "a list of module names, `all-linear`, or null"),
    (["model.lora_target_modules=3"], "a list of module names, `all-linear`, or null"),
    (["model.gradient_checkpointing=maybe"], "valid boolean"),
    (["eval.max_prompts=0"], "greater than or equal to 1"),
])
def test_model_params_are_validated(overrides, expected):
    with pytest.raises(ParamsError, match=expected.replace("[", r"\[").replace("(", r"\(")):
        load_params(REPO / "params.yaml", overrides)


def test_gradient_checkpointing_recomputes_and_is_undone_before_saving(model_dirs):
    from rlhf.models.lora import add_adapters, merged, prepare_for_training, restore_config
    from rlhf.models.loading import lm_logits, load_causal_lm

    model = load_causal_lm(model_dirs["llama"])
    assert prepare_for_training(model, ModelConfig()).config.use_cache is True  # off: untouched
    model = prepare_for_training(model, ModelConfig(gradient_checkpointing=True))
    assert model.config.use_cache is False
    calls, mlp = [], model.model.layers[0].mlp
    real_forward = mlp.forward  # (the recompute skips module hooks, so count calls instead)
    mlp.forward = lambda *args, **kwargs: calls.append(1) or real_forward(*args, **kwargs)
    peft_model = add_adapters(model, ModelConfig(lora=True), "CAUSAL_LM").train()
    ids = torch.randint(3, 200, (2, 8))
    loss = lm_logits(peft_model, ids, torch.ones_like(ids)).float().logsumexp(-1).mean()
    assert len(calls) == 1
    loss.backward()
    assert len(calls) == 2  # the layer ran again in the backward pass
    assert all(p.grad is not None for p in peft_model.parameters() if p.requires_grad)
    plain = restore_config(merged(peft_model))
    assert plain.config.use_cache is True and "_rlhf_use_cache" not in plain.__dict__


def test_ppo_with_lora_keeps_one_copy_of_each_base(tmp_path, model_dirs, data_files, monkeypatch):
    """The policy is adapters on the verified reference weights and the reference is the same
    model with its adapters off; the value model is adapters on the reward model, whose score
    is the trunk with its adapters off. One causal LM and one reward model are loaded."""
    from rlhf.models import loading
    from rlhf.stages import ppo

    params = load_params(REPO / "params.yaml", TINY_OVERRIDES + [
        f"data.source={data_files['explicit']}", f"model.name_or_path={model_dirs['llama']}",
        "model.lora=true"])
    paths = Paths(tmp_path)
    for name in ("prepare", "sft", "reward", "reference"):
        stages.get(name)(params, paths)

    loads = []
    real_lm, real_rm = loading.load_causal_lm, loading.ScalarHeadModel.load.__func__
    monkeypatch.setattr(ppo, "load_causal_lm", lambda p, t=False: loads.append(Path(p)) or real_lm(p, t))
    monkeypatch.setattr(loading.ScalarHeadModel, "load", classmethod(
        lambda cls, p, t=False: loads.append(Path(p)) or real_rm(cls, p, t)))
    _, model, reference, reward_model, _ = ppo.load_models(params, paths)
    assert loads == [paths.reference, paths.reward]

    ids = torch.randint(3, 200, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # some left padding
    fresh_reference = loading.load_causal_lm(paths.reference).eval()
    fresh_reward = loading.ScalarHeadModel.load(paths.reward).eval()
    _perturb_adapters(model)  # as if PPO had trained them
    with torch.no_grad():
        expected = loading.lm_logits(fresh_reference, ids, mask)
        torch.testing.assert_close(loading.lm_logits(reference, ids, mask), expected)
        assert not torch.allclose(loading.lm_logits(model.policy, ids, mask), expected)
        torch.testing.assert_close(reward_model.score(ids, mask), fresh_reward.score(ids, mask))
        assert not torch.allclose(model.value_model.score(ids, mask), fresh_reward.score(ids, mask))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("value_model.head.") for n in trainable)
    assert not any(p.requires_grad for p in reward_model.parameters())


def test_sft_and_reward_with_lora_train_adapters_and_heads_only(tmp_path, model_dirs,
                                                                data_files):
    """LoRA SFT changes only the adapted modules; the reward model's head is trained in full."""
    params = load_params(REPO / "params.yaml", TINY_OVERRIDES + [
        f"data.source={data_files['explicit']}", f"model.name_or_path={model_dirs['gpt2']}",
        "model.lora=true", "model.lora_target_modules=[c_attn, c_fc]",
        "model.gradient_checkpointing=true"])
    paths = Paths(tmp_path)
    for name in ("prepare", "sft", "reward"):
        stages.get(name)(params, paths)
    changed = changed_tensors(weights(model_dirs["gpt2"]), weights(paths.sft))
    assert only_lora_targets(changed, ["c_attn", "c_fc"])
    assert {n.split(".")[-2] for n in changed} == {"c_attn", "c_fc"}
    from rlhf.models.loading import ScalarHeadModel

    reward = ScalarHeadModel.load(paths.reward)
    assert reward.head.weight.abs().sum() > 0
    assert json.loads((paths.sft / "config.json").read_text())["use_cache"] is True


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_disable_dropout_zeroes_the_attention_dropout_rates_too(arch):
    """Llama and Qwen2 apply `config.attention_dropout` as a float in train mode: with 0.1 the
    PPO ratio was not 1 before the first update (0.029 max |log ratio| measured)."""
    from transformers import AutoModelForCausalLM

    from rlhf.models import lora

    tokenizer = build_tokenizer(arch)
    config = tiny_config(arch, len(tokenizer), tokenizer)
    config.attention_dropout = 0.1
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).train()
    ids = torch.randint(3, 200, (2, 12))
    assert not torch.equal(model(ids).logits, model(ids).logits)  # dropout is live
    lora.disable_dropout(model)
    assert torch.equal(model(ids).logits, model(ids).logits)
