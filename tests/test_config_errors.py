"""Every bad config is an exit code 2 with `FILE:LINE: dotted.path: message. Allowed: ...` and no traceback.

Each case is a tiny YAML written into tmp_path (cwd), validated by the real CLI (`arctic_vl validate`,
in-process; a few also in a subprocess). A case names:
  files   {relative path: YAML text}; the CLI validates `bad.yaml`
  args    extra CLI arguments (`--set ...`)
  where   the location the error must name: `FILE:LINE` (line asserted exactly) or the `--set` argument
  path    the dotted field path, on the same line of stderr as `where` (None: the error has no field)
  says    further text that must appear, e.g. what is allowed (registered names, valid keys, enum values)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from arctic_vl.errors import ConfigError

M = "model:\n  family: llava_next\n"  # a model section that needs nothing on disk
D = "data:\n  sources:\n    - train.json\n"  # a data section naming the file `in_tmp` writes


@dataclass
class Bad:
    id: str
    files: dict[str, str]
    where: str
    path: str | None
    says: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)


def bad(id: str, text: str, where_line: int | None, path: str | None, *says: str, args: tuple[str, ...] = (),
        extra: dict[str, str] | None = None, where: str | None = None) -> Bad:
    """A case whose config is `bad.yaml` with `text`; the error is at bad.yaml:`where_line` unless `where`."""
    return Bad(id, {"bad.yaml": text, **(extra or {})}, where or f"bad.yaml:{where_line}", path, list(says), list(args))


CASES = [
    # ---------------------------------------------------------------- unknown registered names
    bad("unknown_model_type", "model:\n  type: hf_vlmx\n  family: llava_next\n" + D, 2, "model.type",
        "unknown model factory type 'hf_vlmx'", "Registered:", "hf_vlm", "Did you mean 'hf_vlm'?"),
    bad("unknown_scheduler_type", M + D + "scheduler:\n  type: cosin\n", 7, "scheduler.type",
        "Registered:", "constant, cosine", "Did you mean 'cosine'?"),
    bad("unknown_callback_type", M + D + "callbacks:\n  - type: progres\n", 7, "callbacks[0].type",
        "unknown callback type 'progres'", "Registered:", "progress", "save_delay"),
    bad("type_not_a_string", "model:\n  type: 3\n  family: llava_next\n" + D, 2, "model.type", "Registered:", "hf_vlm"),
    bad("unknown_family", "model:\n  family: llava_nxt\n" + D, 2, "model.family",
        "unknown family 'llava_nxt'", "llava_next", "qwen2_5_vl"),
    # ---------------------------------------------------------------- typo keys (nested too)
    bad("typo_trainer_key", M + D + "trainer:\n  max_steps: 1\n  max_stesp: 3\n", 8, "trainer.max_stesp",
        "unknown key (did you mean 'max_steps'?)", "Allowed: bf16, compile, detect_anomaly, epochs,", "max_steps"),
    bad("typo_source_key", M + "data:\n  sources:\n    - path: train.json\n      formatt: llava\n", 6,
        "data.sources[0].formatt", "did you mean 'format'?", "Allowed: format, image_root, path, sample, weight"),
    bad("typo_model_key", "model:\n  family: llava_next\n  dtyp: float32\n" + D, 3, "model.dtyp",
        "did you mean 'dtype'?", "Allowed:", "attn_implementation"),
    bad("typo_optimizer_key", M + D + "optimizer:\n  lr: 1.0e-4\n  betass: [0.9, 0.99]\n", 8, "optimizer.betass",
        "did you mean 'betas'?", "Allowed: betas, eps"),
    bad("typo_eval_key", M + D + "eval:\n  every_n_step: 5\n", 7, "eval.every_n_step",
        "did you mean 'every_n_steps'?", "Allowed: every_n_steps, generate"),
    bad("typo_callback_key", M + D + "callbacks:\n  - type: throughput\n    evry: 3\n", 8, "callbacks[0].evry",
        "unknown key", "Allowed:"),
    bad("typo_section", M + D + "trainr:\n  max_steps: 2\n", 6, "trainr",
        "unknown section (did you mean 'trainer'?)", "Allowed: model, data, trainer, optimizer"),
    bad("typo_in_base_config", "extends: base/base.yaml\n" + M + D, 3, "trainer.max_stesp",
        "did you mean 'max_steps'?", where="base.yaml:3",
        extra={"base/base.yaml": "trainer:\n  seed: 1\n  max_stesp: 3\n"}),
    bad("typo_by_set", M + D, None, "trainer.max_stesp", "did you mean 'max_steps'?", "Allowed:",
        args=("--set", "trainer.max_stesp=3"), where="--set trainer.max_stesp=3"),
    # ---------------------------------------------------------------- wrong types
    bad("wrong_type_int", M + D + "  micro_batch_size: lots\n", 6, "data.micro_batch_size",
        "valid integer", "'lots'"),
    bad("wrong_type_bool", M + D + "trainer:\n  bf16: maybe\n", 7, "trainer.bf16", "valid boolean"),
    bad("wrong_type_dict_values", "model:\n  family: llava_next\n  tiny: {layers: many}\n" + D, 3,
        "model.tiny.layers", "valid integer"),
    bad("section_not_a_mapping", M + D + "trainer: 5\n", 6, "trainer", "must be a mapping with a `type`"),
    bad("callbacks_not_a_list", M + D + "callbacks:\n  type: progress\n", 6, "callbacks", "must be a list"),
    bad("source_neither_path_nor_mapping", M + "data:\n  sources:\n    - 5\n", 5, "data.sources[0]",
        "valid string", "SourceSpec"),
    # ---------------------------------------------------------------- missing fields
    bad("missing_model_section", D, 1, "model", "required section missing"),
    bad("missing_data_sources", M + "data:\n  micro_batch_size: 2\n", 3, "data.sources", "required field missing"),
    bad("missing_model_source", "model:\n  dtype: float32\n" + D, 1, "model", "give name_or_path", "or family"),
    bad("missing_source_path", M + "data:\n  sources:\n    - format: llava\n", 5, "data.sources[0].path",
        "required field missing"),
    # ---------------------------------------------------------------- duplicate keys
    bad("duplicate_key", M + D + "trainer:\n  max_steps: 1\n  max_steps: 2\n", 8, "trainer.max_steps",
        "duplicate key (first given at bad.yaml:7)"),
    bad("duplicate_section", M + D + "model:\n  family: qwen2_vl\n", 6, "model", "duplicate key"),
    # ---------------------------------------------------------------- extends
    bad("extends_missing_file", "extends: nope.yaml\n" + M + D, 1, "extends", "file not found: nope.yaml"),
    bad("extends_missing_in_list", "extends:\n  - base.yaml\n  - nope.yaml\n" + M + D, 3, "extends[1]",
        "file not found: nope.yaml", extra={"base.yaml": "trainer:\n  seed: 3\n"}),
    bad("extends_cycle", "extends: b.yaml\n" + M + D, None, "extends", "cycle", "b.yaml -> ",
        where="b.yaml:3", extra={"b.yaml": "trainer:\n  seed: 3\nextends: bad.yaml\n"}),
    bad("extends_self", "extends: ./bad.yaml\n" + M + D, 1, "extends", "cycle: bad.yaml -> bad.yaml"),
    bad("extends_wrong_type", "extends: {file: base.yaml}\n" + M + D, 1, "extends",
        "must be a file path or a list of file paths"),
    bad("extends_wrong_item_type", "extends: [base.yaml, 3]\n" + M + D, 1, "extends",
        "must be a file path or a list of file paths"),
    bad("broken_base_yaml", "extends: base.yaml\n" + M + D, 2, None, "invalid YAML", where="base.yaml:2",
        extra={"base.yaml": "trainer:\n\tseed: 3\n"}),
    # ---------------------------------------------------------------- --set
    bad("set_without_equals", M + D, None, None, "expected KEY=VALUE",
        args=("--set", "trainer.max_steps"), where="--set trainer.max_steps"),
    bad("set_bad_yaml_value", M + D, None, "trainer.max_steps", "value is not valid YAML",
        args=("--set", "trainer.max_steps=[1"), where="--set trainer.max_steps=[1"),
    bad("set_bad_tagged_value", M + D, None, "trainer.seed", "value is not valid YAML",
        args=("--set", "trainer.seed=!!int x"), where="--set trainer.seed=!!int x"),
    bad("set_path_into_scalar", M + D + "trainer:\n  max_steps: 2\n", None, "trainer.max_steps",
        "is not a mapping", args=("--set", "trainer.max_steps.x=1"), where="--set trainer.max_steps.x=1"),
    bad("set_no_such_list_item", M + D, None, "data.sources[3]", "no such list item",
        args=("--set", "data.sources.3=x.json"), where="--set data.sources.3=x.json"),
    bad("set_empty_key_part", M + D, None, None, "empty name in dotted key",
        args=("--set", "trainer..seed=1"), where="--set trainer..seed=1"),
    bad("set_invalid_value", M + D, None, "trainer.max_steps", "greater than or equal to 1",
        args=("--set", "trainer.max_steps=-3"), where="--set trainer.max_steps=-3"),
    bad("set_unknown_section", M + D, None, "trainr", "unknown section (did you mean 'trainer'?)",
        args=("--set", "trainr.max_steps=3"), where="--set trainr.max_steps=3"),
    # ---------------------------------------------------------------- broken YAML
    bad("yaml_bad_indentation", "model:\n  family: llava_next\n data:\n  sources: [train.json]\n", 3, None,
        "invalid YAML"),
    bad("yaml_unclosed_bracket", M + "data:\n  sources: [train.json\ntrainer:\n  max_steps: 2\n", 4, None,
        "invalid YAML", "not closed", "(at line 5)"),
    bad("yaml_unclosed_quote", M + D + "  system_prompt: 'hello\n  shuffle: false\n", 6, None,
        "invalid YAML", "not closed"),
    bad("yaml_tab", "model:\n\tfamily: llava_next\n" + D, 2, None, "invalid YAML", "tabs"),
    bad("yaml_bad_tagged_scalar", "model:\n  family: llava_next\n  seed: !!int abc\n" + D, 3, "model.seed",
        "invalid YAML value 'abc'"),
    bad("yaml_bad_date", "model:\n  family: llava_next\n  seed: 2020-13-45\n" + D, 3, "model.seed",
        "invalid YAML value '2020-13-45'"),
    bad("yaml_python_tag", "model:\n  family: !!python/name:os.system\n" + D, 2, "model.family",
        "YAML tag !!python/name:os.system is not allowed"),
    bad("yaml_merge_key", "defaults: &d\n  family: llava_next\nmodel:\n  <<: *d\n" + D, 4, "model",
        "merge keys (<<) are not supported", "extends"),
    bad("yaml_not_a_mapping", "- model\n- data\n", 1, None, "must be a mapping of sections"),
    # ---------------------------------------------------------------- YAML that is not plain data (issue 12: 4, 5)
    bad("yaml_tag_on_sequence",
        "model:\n  family: llava_next\n  lora: !!python/object/apply:os.system [\"echo hi\"]\n" + D,
        3, "model.lora", "YAML tag !!python/object/apply:os.system is not allowed", "plain mappings, lists"),
    bad("yaml_tag_on_mapping", "model: !!python/object/new:arctic_vl.Engine {family: llava_next}\n" + D, 1, "model",
        "YAML tag !!python/object/new:arctic_vl.Engine is not allowed"),
    bad("yaml_tag_on_nested_item", M + "data:\n  sources:\n    - !!python/object/apply:os.getcwd []\n", 5,
        "data.sources[0]", "YAML tag !!python/object/apply:os.getcwd is not allowed"),
    bad("yaml_tag_on_key", "model:\n  ? !!python/tuple [a, b]\n  : 1\n" + D, 2, "model.<key>",
        "YAML tag !!python/tuple is not allowed"),
    bad("yaml_local_tag", "model: !mine {family: llava_next}\n" + D, 1, "model", "YAML tag !mine is not allowed"),
    bad("yaml_set", "model:\n  family: llava_next\n  freeze: !!set {vision, llm}\n" + D, 3, "model.freeze",
        "YAML tag !!set is not allowed"),
    bad("yaml_binary", "model:\n  family: !!binary bGxhdmFfbmV4dA==\n" + D, 2, "model.family",
        "YAML tag !!binary is not allowed"),
    bad("yaml_tag_in_base_config", "extends: base.yaml\n" + M + D, 2, "trainer",
        "YAML tag !!python/object/apply:os.system",
        where="base.yaml:2", extra={"base.yaml": "trainer:\n  !!python/object/apply:os.system [ls]\n"}),
    bad("yaml_alias_bomb", M + D + "x:\n  a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
        + "".join(f"  {chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 10) + "]\n" for i in range(8)),
        7, None, "expands to more than 100000 values", "YAML anchors and aliases"),
    bad("yaml_recursive_alias", "model:\n  family: llava_next\n  freeze: &a [vision, *a]\n" + D, 3,
        "model.freeze[1][1]",
        "nested deeper than 64 levels", "a YAML alias that contains itself"),
    bad("yaml_deep_nesting", "model:\n  family: llava_next\n  freeze: " + "[" * 3000 + "]" * 3000 + "\n" + D, 3, None,
        "nested deeper than 64 levels"),
    bad("yaml_control_character", M + D + "  system_prompt: a\x07b\n", 6, None, "character U+0007 is not allowed"),
    bad("set_deep_nesting", M + D, None, "trainer.seed", "nested deeper than 64 levels",
        args=("--set", "trainer.seed=" + "[" * 3000 + "]" * 3000),
        where="--set trainer.seed=" + "[" * 3000 + "]" * 3000),
    bad("set_tagged_sequence", M + D, None, "trainer.seed", "YAML tag !!python/object/apply:os.system is not allowed",
        args=("--set", "trainer.seed=!!python/object/apply:os.system [ls]"),
        where="--set trainer.seed=!!python/object/apply:os.system [ls]"),
    bad("yaml_non_scalar_key", "model:\n  ? [a, b]\n  : 1\n" + D, 2, "model", "a key must be a plain scalar"),
    # ---------------------------------------------------------------- values out of range
    bad("empty_sources", M + "data:\n  sources: []\n", 4, "data.sources", "at least 1 item"),
    bad("bad_enum_dtype", "model:\n  family: llava_next\n  dtype: fp8\n" + D, 3, "model.dtype",
        "'float32', 'bfloat16' or 'float16'", "'fp8'"),
    bad("bad_enum_list_item", "model:\n  family: llava_next\n  freeze: [vision, lm]\n" + D, 3, "model.freeze[1]",
        "'vision', 'aligner' or 'llm'"),
    bad("bad_enum_source_format", M + "data:\n  sources:\n    - path: train.json\n      format: csv\n", 6,
        # installed plugins' record formats come between the core's and the source kinds'
        "data.sources[0].format", "'auto', 'llava', 'messages', 'dense_caption', ", " or 'hf_disk'"),
    bad("bad_enum_on_bad_record", M + D + "  on_bad_record: ignore\n", 6, "data.on_bad_record", "'error' or 'skip'"),
    bad("negative_max_steps", M + D + "trainer:\n  max_steps: -1\n", 7, "trainer.max_steps",
        "greater than or equal to 1"),
    bad("zero_grad_accumulation", M + D + "trainer:\n  gradient_accumulation_steps: 0\n", 7,
        "trainer.gradient_accumulation_steps", "greater than or equal to 1"),
    bad("negative_num_workers", M + D + "  num_workers: -2\n", 6, "data.num_workers", "greater than or equal to 0"),
    bad("zero_source_weight", M + "data:\n  sources:\n    - path: train.json\n      weight: 0\n", 6,
        "data.sources[0].weight", "greater than 0"),
    bad("eval_zero_tokens", M + D + "eval:\n  max_new_tokens: 0\n", 7, "eval.max_new_tokens",
        "greater than or equal to 1"),
    # ---------------------------------------------------------------- meaningless values (issue 12: 6)
    bad("empty_output_dir", M + D + "trainer:\n  output_dir: ''\n", 7, "trainer.output_dir",
        "a path must not be empty"),
    bad("blank_output_dir", M + D + "trainer:\n  output_dir: '   '\n", 7, "trainer.output_dir", "must not be empty"),
    bad("nul_in_path", M + "data:\n  sources: [\"train\\0.json\"]\n", 4, "data.sources[0]", "NUL byte"),
    bad("empty_source_path", M + "data:\n  sources:\n    - path: ''\n", 5, "data.sources[0].path", "must not be empty"),
    bad("infinite_lr", M + D + "optimizer:\n  lr: .inf\n", 7, "optimizer.lr", "finite number"),
    bad("nan_lr_by_set", M + D, None, "optimizer.lr", "finite number", args=("--set", "optimizer.lr=.nan"),
        where="--set optimizer.lr=.nan"),
    bad("infinite_epochs", M + D + "trainer:\n  epochs: .inf\n", 7, "trainer.epochs", "finite number"),
    bad("infinite_betas", M + D + "optimizer:\n  betas: [0.9, .inf]\n", 7, "optimizer.betas[1]", "finite number"),
    bad("betas_out_of_range", M + D + "optimizer:\n  betas: [1.5, 0.9]\n", 7, "optimizer.betas[0]", "less than 1"),
    bad("infinite_lora_alpha", "model:\n  family: llava_next\n  lora:\n    alpha: .inf\n" + D, 4, "model.lora.alpha",
        "must be a finite number (got inf)"),
    bad("infinite_source_weight", M + "data:\n  sources:\n    - path: train.json\n      weight: .inf\n", 6,
        "data.sources[0].weight", "must be a finite number (got inf)"),
    bad("nan_group_weight_decay", M + D + "optimizer:\n  param_groups:\n    - name: g\n      parts: [llm]\n"
        "      weight_decay: .nan\n", 10, "optimizer.param_groups[0].weight_decay", "nan"),
    bad("infinite_deepspeed_value",
        M + D + "distributed:\n  type: deepspeed\n  config:\n    gradient_predivide_factor: .inf\n",
        9, "distributed.config.gradient_predivide_factor", "must be a finite number (got inf)"),
    bad("seed_too_large", M + D + "trainer:\n  seed: 99999999999999999999\n", 7, "trainer.seed",
        "less than or equal to 4294967295"),
    bad("seed_negative", M + D + "trainer:\n  seed: -1\n", 7, "trainer.seed", "greater than or equal to 0"),
    bad("seed_boolean", M + D + "trainer:\n  seed: yes\n", 7, "trainer.seed", "not a boolean"),
    bad("model_seed_too_large", "model:\n  family: llava_next\n  seed: 4294967296\n" + D, 3, "model.seed",
        "less than or equal to 4294967295"),
    bad("timeout_overflow", M + D + "distributed:\n  type: ddp\n  timeout_minutes: 99999999999\n", 8,
        "distributed.timeout_minutes", "less than or equal to 525600"),
    # ---------------------------------------------------------------- model.tiny (issue 12: 7)
    bad("tiny_unknown_key", "model:\n  family: llava_next\n  tiny:\n    layers: 2\n    bogus: 3\n" + D, 5,
        "model.tiny.bogus", "unknown key", "Allowed: anyres_grid, heads, hidden, image_size, intermediate, kv_heads, "
        "layers, patch_size, vision_hidden, vision_layers, vocab_size"),
    bad("tiny_out_of_range", "model:\n  family: llava_next\n  tiny: {layers: 0}\n" + D, 3, "model.tiny.layers",
        "greater than or equal to 1"),
    bad("tiny_heads_do_not_divide", "model:\n  family: llava_next\n  tiny: {hidden: 64, heads: 3}\n" + D, 3,
        "model.tiny", "tiny.heads (3) must divide tiny.hidden (64)"),
    bad("tiny_odd_head_size", "model:\n  family: llava_next\n  tiny: {hidden: 12, heads: 4, kv_heads: 1}\n" + D, 3,
        "model.tiny", "must be even"),
    bad("tiny_vocab_too_small", "model:\n  family: llava_next\n  tiny: {vocab_size: 100}\n" + D, 3, "model.tiny",
        "smaller than the tokenizer"),
    bad("tiny_anyres_on_qwen", "model:\n  family: qwen2_vl\n  tiny: {anyres_grid: 2}\n" + D, 3, "model.tiny",
        "applies to the LLaVA families"),
    bad("tiny_qwen_vision_heads", "model:\n  family: qwen2_vl\n  tiny: {vision_hidden: 36}\n" + D, 3, "model.tiny",
        "multiple of 4"),
    bad("tiny_with_name_or_path", "model:\n  name_or_path: .\n  tiny: {layers: 2}\n" + D, 3, "model.tiny",
        "tiny: only applies with family"),
    # ---------------------------------------------------------------- output_dir on the filesystem (issue 12: 8)
    bad("output_dir_is_a_file", M + D + "trainer:\n  output_dir: train.json\n", 7, "trainer.output_dir",
        "train.json is an existing file"),
    bad("output_dir_under_a_file", M + D + "trainer:\n  output_dir: train.json/run\n", 7, "trainer.output_dir",
        "train.json/run lies under", "train.json, which is a file"),
    bad("output_dir_default_under_a_file", M + D, None, "trainer.output_dir", "runs/run lies under",
        where="bad.yaml:1", extra={"runs": "a file where the default runs/ directory would go\n"}),
    # ---------------------------------------------------------------- DeepSpeed pass-through (issue 12: 16)
    bad("ds_import_key", M + D + "distributed:\n  type: deepspeed\n  config:\n    torch_autocast:\n"
        "      enabled: true\n      lower_precision_safe_modules: [evilmod.Evil]\n", 11,
        "distributed.config.torch_autocast.lower_precision_safe_modules", "DeepSpeed imports the module",
        "a config never names Python code"),
    bad("ds_checkpoint_engine", M + D + "distributed:\n  type: deepspeed\n  config:\n    checkpoint:\n"
        "      load_universal: true\n", 9, "distributed.config.checkpoint", "the engine writes, verifies and loads"),
    bad("ds_unknown_key", M + D + "distributed:\n  type: deepspeed\n  config:\n    pipeline: {stages: 2}\n", 9,
        "distributed.config.pipeline", "not a pass-through key; allowed: activation_checkpointing, bf16"),
    bad("ds_unknown_sub_key", M + D + "distributed:\n  type: deepspeed\n  config:\n    zero_optimization:\n"
        "      zenflow: {topk_ratio: 0.1}\n", 10, "distributed.config.zero_optimization.zenflow",
        "allowed under zero_optimization:"),
    bad("ds_nvme_offload", M + D + "distributed:\n  type: deepspeed\n  config:\n    zero_optimization:\n"
        "      offload_optimizer: {device: nvme, nvme_path: /tmp}\n", 10,
        "distributed.config.zero_optimization.offload_optimizer", "set distributed.offload_optimizer"),
    bad("ds_mapping_for_a_value", M + D + "distributed:\n  type: deepspeed\n  config:\n    communication_data_type: "
        "{type: x}\n", 9, "distributed.config.communication_data_type", "must be a number, flag, string"),
    bad("ds_contradicts_bf16", M + D + "distributed:\n  type: deepspeed\n  config:\n    bf16: {enabled: true}\n", 9,
        "distributed.config.bf16.enabled", "contradicts the engine config", "set trainer.bf16"),
    bad("ds_contradicts_stage", M + D + "distributed:\n  type: deepspeed\n  zero_stage: 3\n  config:\n"
        "    zero_optimization: {stage: 1}\n", 10, "distributed.config.zero_optimization.stage",
        "set distributed.zero_stage"),
    bad("ds_contradicts_clipping", M + D + "distributed:\n  type: deepspeed\n  config:\n    gradient_clipping: 5\n", 9,
        "distributed.config.gradient_clipping", "set trainer.max_grad_norm"),
    bad("sample_first_x", M + "data:\n  sources:\n    - path: train.json\n      sample: \"first:x\"\n", 6,
        "data.sources[0].sample", "all, first:N, random:N"),
    # ---------------------------------------------------------------- model directories
    bad("model_dir_missing", "model:\n  name_or_path: ./no_such_model\n" + D, 2, "model.name_or_path",
        "no_such_model does not exist"),
    bad("model_dir_without_config_json", "model:\n  name_or_path: .\n" + D, 2, "model.name_or_path",
        "has no config.json"),
    bad("model_hub_like_id_missing", "model:\n  name_or_path: some-org/no-such-model\n" + D, 2, "model",
        "config.json: not found", "model.name_or_path must be a local HF model directory"),
    bad("name_or_path_and_family", "model:\n  family: llava_next\n  name_or_path: x\n" + D, 3,
        "model.name_or_path", "give name_or_path or family, not both"),
    bad("model_type_unsupported", "model:\n  name_or_path: m\n" + D, 2, "model.name_or_path",
        "has model_type 'idefics3', which arctic_vl cannot train; supported model types: llava, llava_next,",
        "qwen3_vl", extra={"m/config.json": '{"model_type": "idefics3"}'}),
    bad("model_config_json_broken", "model:\n  name_or_path: m\n" + D, 2, "model.name_or_path",
        "config.json is not a valid HF config", extra={"m/config.json": '{"model_type": '}),
    # ---------------------------------------------------------------- files the config names must exist
    bad("data_source_missing", M + "data:\n  sources:\n    - train.json\n    - nope.json\n", 6, "data.sources[1]",
        "nope.json does not exist", "relative to the file that sets it"),
    bad("data_source_spec_missing", M + "data:\n  sources:\n    - {path: gone/x.jsonl, weight: 2}\n", 5,
        "data.sources[0].path", "gone/x.jsonl does not exist (nor does its folder"),
    bad("eval_source_missing", M + D + "  eval_sources: [heldout.json]\n", 6, "data.eval_sources[0]",
        "heldout.json does not exist"),
    bad("image_root_missing", M + "data:\n  sources:\n    - path: train.json\n      image_root: imgs\n", 6,
        "data.sources[0].image_root", "imgs does not exist"),
    bad("data_source_missing_by_set", M + D, None, "data.sources[0]", "x.json does not exist",
        args=("--set", "data.sources=[x.json]"), where="--set data.sources=[x.json]"),
    bad("data_source_missing_in_base", "extends: base/base.yaml\n" + M, 3, "data.sources[0]",
        "base/train.json does not exist", where="base.yaml:3", extra={"base/base.yaml": D}),
]


def check_error(rc: int, err: str, case: Bad) -> None:
    assert rc == 2, err
    assert "Traceback" not in err, err
    assert "arctic_vl: error:" in err, err
    hits = [ln for ln in err.splitlines() if f"{case.where}: " in ln or ln.endswith(f"{case.where}:")]
    assert hits, f"no line naming {case.where!r} in:\n{err}"
    if case.path is not None:
        assert any(case.path in ln for ln in hits), f"{case.path!r} not on the line of {case.where!r}:\n{err}"
    for text in case.says:
        assert text in err, f"{text!r} not in:\n{err}"


def write_case(case: Bad, root) -> None:
    for rel, text in case.files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_at_least_twenty_distinct_cases():
    assert len(CASES) >= 20
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_config(case: Bad, in_tmp, cli):
    write_case(case, in_tmp)
    rc, out, err = cli("validate", "bad.yaml", *case.args)
    check_error(rc, err, case)
    assert "# config OK" not in out


SUBPROCESS_CASES = ("typo_source_key", "yaml_unclosed_bracket", "set_bad_yaml_value")


@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
def test_bad_config_subprocess(case_id, tmp_path, cli_subprocess):
    """The same through a real process: what a user sees in a terminal."""
    (case,) = [c for c in CASES if c.id == case_id]
    (tmp_path / "train.json").write_text("[]\n")
    write_case(case, tmp_path)
    rc, _, err = cli_subprocess("validate", "bad.yaml", *case.args, cwd=tmp_path)
    check_error(rc, err, case)


def test_train_verb_reports_config_errors_the_same(in_tmp, cli):
    """`arctic_vl CONFIG` (train) validates before anything heavy: same exit code and message."""
    (case,) = [c for c in CASES if c.id == "typo_trainer_key"]
    write_case(case, in_tmp)
    rc, _, err = cli("bad.yaml")
    check_error(rc, err, case)


def test_several_errors_reported_at_once(in_tmp, cli):
    (in_tmp / "bad.yaml").write_text(M + D + "  micro_batch_size: 0\ntrainer:\n  max_stesp: 3\noptimizer:\n  lr: x\n")
    rc, _, err = cli("validate", "bad.yaml")
    assert rc == 2 and "Traceback" not in err
    for where, path in (("bad.yaml:6", "data.micro_batch_size"), ("bad.yaml:8", "trainer.max_stesp"),
                        ("bad.yaml:10", "optimizer.lr")):
        assert f"{where}: {path}: " in err, err


def test_missing_config_file(in_tmp, cli):
    rc, _, err = cli("validate", "nope.yaml")
    assert rc == 2 and "Traceback" not in err
    assert "nope.yaml: config file not found" in err


def test_engine_dict_with_typo_names_dotted_path(in_tmp):
    from arctic_vl import Engine

    with pytest.raises(ConfigError) as info:
        Engine({"model": {"family": "llava_next"}, "data": {"sources": ["train.json"]},
                "trainer": {"max_stesp": 3}})
    msg = str(info.value)
    assert "config[trainer.max_stesp]: trainer.max_stesp: unknown key (did you mean 'max_steps'?)" in msg
    assert "Allowed:" in msg and "max_steps" in msg


def test_engine_dict_with_nested_list_typo(in_tmp):
    from arctic_vl import Engine

    with pytest.raises(ConfigError) as info:
        Engine({"model": {"family": "llava_next"}, "data": {"sources": [{"path": "train.json", "formatt": "llava"}]}})
    msg = str(info.value)
    assert "config[data.sources[0].formatt]: data.sources[0].formatt: unknown key" in msg
    assert "Allowed: format, image_root, path, sample, weight" in msg
    assert ".str:" not in msg and "SourceSpec.formatt" not in msg  # pydantic's union tags are not a path


def test_engine_rejects_a_non_mapping():
    from arctic_vl import Engine

    with pytest.raises(ConfigError, match="mapping of sections, got list"):
        Engine(["model"])  # type: ignore[arg-type]


def test_paths_a_run_creates_need_not_exist(in_tmp, cli):
    """output_dir (and an inline tiny model, written under it) are created by the run: validation passes."""
    (in_tmp / "ok.yaml").write_text(M + D + "trainer:\n  output_dir: runs/not/yet/there\n"
                                    "callbacks:\n  - {type: tensorboard, log_dir: tb/new}\n")
    rc, out, err = cli("validate", "ok.yaml")
    assert rc == 0, err
    assert "# config OK" in out and not (in_tmp / "runs").exists()


def test_missing_data_file_found_by_every_entry_point(in_tmp):
    """The same check runs wherever a config is loaded (train, evaluate, Engine(dict)), before any work."""
    from arctic_vl import Engine

    with pytest.raises(ConfigError,
                       match=r"config\[data.sources\[0\]\]: data.sources\[0\]: .*nope.json does not exist"):
        Engine({"model": {"family": "llava_next"}, "data": {"sources": ["nope.json"]}})


# ------------------------------------------------------------------------ encodings, unwritable dirs, dicts
@pytest.mark.parametrize("where", ["config", "base"])
def test_latin1_byte_names_file_and_line(in_tmp, cli, where):
    latin = (M + D + "# caf\xe9\n").encode("latin-1")
    if where == "config":
        (in_tmp / "bad.yaml").write_bytes(latin)
    else:
        (in_tmp / "base.yaml").write_bytes(latin)
        (in_tmp / "bad.yaml").write_text("extends: base.yaml\n")
    rc, _, err = cli("validate", "bad.yaml")
    shown = "bad.yaml" if where == "config" else "base.yaml"
    check_error(rc, err, Bad("latin1", {}, f"{shown}:6", None,
                             ["not UTF-8 text: byte 0xe9 at column 6", "save the file as UTF-8"]))


def test_utf8_with_bom_and_non_ascii_text_are_fine(in_tmp, cli):
    (in_tmp / "good.yaml").write_bytes(("\ufeff" + M + D + "  system_prompt: café ☕\n").encode("utf-8"))
    rc, _, err = cli("validate", "good.yaml")
    assert rc == 0, err
    from arctic_vl.config.schema import load_config

    assert load_config(in_tmp / "good.yaml").data.system_prompt == "café ☕"


def test_output_dir_not_writable(in_tmp, cli):
    import os

    if os.geteuid() != 0:
        locked = in_tmp / "locked"
        locked.mkdir(mode=0o555)
        target, blocked = locked / "run", locked
    elif not os.access("/proc/sys", os.W_OK):  # root may write anywhere but a read-only filesystem
        target, blocked = Path("/proc/sys/arctic_vl_run"), Path("/proc/sys")
    else:  # pragma: no cover - depends on the machine
        pytest.skip("no directory this user cannot write")
    (in_tmp / "bad.yaml").write_text(M + D + f"trainer:\n  output_dir: {target}\n")
    rc, _, err = cli("validate", "bad.yaml")
    check_error(rc, err, Bad("ro", {}, "bad.yaml:7", "trainer.output_dir",
                             [f"{target} cannot be created: {blocked} is not writable"]))


def test_plain_yaml_reader_for_data_lists(tmp_path):
    """`read_plain_yaml` (for YAML files other than configs, e.g. data-source lists): the same rules."""
    from arctic_vl.config.loader import read_plain_yaml

    good = tmp_path / "mix.yaml"
    good.write_text("datasets:\n  - json_path: a.json\n    sampling_strategy: first:5\n")
    assert read_plain_yaml(good) == {"datasets": [{"json_path": "a.json", "sampling_strategy": "first:5"}]}
    for text, says in (("datasets: !!python/object/apply:os.system [ls]\n", "mix.yaml:1: datasets: YAML tag"),
                       ("datasets: " + "[" * 200 + "]" * 200 + "\n", "mix.yaml:1: invalid YAML: nested deeper"),
                       (b"datasets: [caf\xe9]\n", "mix.yaml:1: not UTF-8 text")):
        good.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(ConfigError, match=says):
            read_plain_yaml(good)


def test_yaml_data_list_is_read_by_the_hardened_reader(tmp_path):
    """A data-source YAML list with an alias bomb or a python tag: a ConfigError naming the list and the line, as
    the config itself would get (the source kind reads it with `read_plain_yaml`, not yaml.safe_load)."""
    from arctic_vl.data.sources import source_kind

    (tmp_path / "a.json").write_text("[]")
    mix = tmp_path / "mix.yaml"
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(6))
    for text, says in ((bomb + "datasets: []\n", r"mix.yaml:\d+: .*expands to more than 100000 values"),
                       ("datasets:\n  - !!python/name:os.system {}\n", "mix.yaml:2: .*YAML tag")):
        mix.write_text(text)
        with pytest.raises(ConfigError, match=says):
            source_kind(mix, "auto").files(mix)


def test_validate_finds_a_missing_file_of_a_yaml_data_list(in_tmp, cli):
    """A `datasets:` list naming a file that does not exist: validate exits 2 naming the config line, the list,
    the entry and the resolved path (before: validate passed and training failed with a raw FileNotFoundError)."""
    (in_tmp / "mix.yaml").write_text("datasets:\n  - json_path: train.json\n  - json_path: nope.json\n")
    (in_tmp / "bad.yaml").write_text(M + "data:\n  sources: [mix.yaml]\n")
    rc, _, err = cli("validate", "bad.yaml")
    assert rc == 2 and "Traceback" not in err
    assert (f"bad.yaml:3: data: {in_tmp / 'mix.yaml'}: datasets[1].json_path: {in_tmp / 'nope.json'} "
            "does not exist") in err


def test_engine_dict_that_contains_itself_is_refused(in_tmp):
    from arctic_vl import Engine

    model: dict = {"family": "llava_next"}
    model["lora"] = model
    with pytest.raises(ConfigError, match=r"config\[model.lora.lora.lora.lora.lora...\]: nested deeper than 64"):
        Engine({"model": model, "data": {"sources": ["train.json"]}})


def test_seed_type_is_public_and_bounded():
    from pydantic import BaseModel, ValidationError

    import arctic_vl

    class WithSeed(BaseModel):
        seed: arctic_vl.Seed = 0

    assert WithSeed(seed=2**32 - 1).seed == 2**32 - 1
    for bad_seed in (-1, 2**32, True):
        with pytest.raises(ValidationError):
            WithSeed(seed=bad_seed)
    assert set(arctic_vl.__all__) == set(arctic_vl._LAZY)
    assert arctic_vl.TinyModelConfig(layers=2).given() == {"layers": 2}
    assert issubclass(arctic_vl.CheckpointError, Exception)
    assert not issubclass(arctic_vl.CheckpointError, arctic_vl.UserError)


# ------------------------------------------------------- issue 24 items 7, 8: paths through loops, absurd weights
def _loop(root: Path, name: str = "loop") -> str:
    """A symbolic link loop `name` -> `name`2 -> `name` under root; returns its name."""
    (root / name).symlink_to(root / f"{name}2")
    (root / f"{name}2").symlink_to(root / name)
    return name


@pytest.mark.parametrize("case", ["config", "extends", "extends_nul", "source", "name_or_path", "image_root"])
def test_paths_through_a_symlink_loop_or_with_a_nul_byte_are_named(in_tmp, cli, case):
    """issue 24 item 7: a path through a symbolic link loop (or with a NUL byte) is exit 2 naming the config file,
    its line and the path, never `RuntimeError: Symlink loop` / `ValueError: embedded null byte`."""
    loop = _loop(in_tmp)
    texts = {
        "config": (None, "", "config file: loop.yaml: a symbolic link loop"),
        "extends": (f"extends: {loop}/base.yaml\n" + M + D, 1, f"extends: {loop}/base.yaml: a symbolic link loop"),
        "extends_nul": ('extends: "base\\0.yaml"\n' + M + D, 1, "extends: 'base\\x00.yaml': a path must not contain a "
                                                               "NUL byte"),
        "source": (M + f"data:\n  sources:\n    - {loop}/train.json\n", 5, f"data.sources[0]: {loop}/train.json: a "
                                                                           "symbolic link loop"),
        "name_or_path": (f"model:\n  name_or_path: {loop}/model\n" + D, 2, f"model.name_or_path: {loop}/model: a "
                                                                           "symbolic link loop"),
        "image_root": (M + f"data:\n  sources:\n    - path: train.json\n      image_root: {loop}\n", 6,
                       f"data.sources[0].image_root: {loop}: a symbolic link loop"),
    }
    text, line, says = texts[case]
    if case == "config":
        (in_tmp / "loop.yaml").symlink_to(in_tmp / "loop.yaml")
        rc, _, err = cli("validate", "loop.yaml")
    else:
        (in_tmp / "bad.yaml").write_text(text)
        rc, _, err = cli("validate", "bad.yaml")
        says = f"bad.yaml:{line}: {says}"
    assert rc == 2 and "Traceback" not in err, err
    assert says in err, err


def test_extends_naming_a_binary_file_names_both_files(in_tmp, cli):
    """issue 19 item 16: the binary's "line 1" AND the config file and line that named it."""
    (in_tmp / "blob.bin").write_bytes(b"\x00\x01\xff\xfe" * 8)
    (in_tmp / "bad.yaml").write_text(M + D + "extends: blob.bin\n")
    rc, _, err = cli("validate", "bad.yaml")
    assert rc == 2 and "Traceback" not in err, err
    assert "blob.bin:1: not UTF-8 text: byte 0xff" in err and "(named by bad.yaml:6: extends)" in err, err


def test_an_absurd_source_weight_is_refused_at_validate(in_tmp, cli):
    """issue 24 item 8: weight 1e9 (a ~96 GB list on a 12-record file) is refused by validate, with file and line."""
    (in_tmp / "bad.yaml").write_text(M + "data:\n  sources:\n    - path: train.json\n      weight: 1.0e9\n")
    rc, _, err = cli("validate", "bad.yaml")
    check_error(rc, err, Bad("weight", {}, "bad.yaml:6", "data.sources[0].weight",
                             ["weight 1e+09 is absurd: at most 10000"]))


def test_a_model_config_json_past_the_parsers_limits_is_named(in_tmp, cli):
    """issue 24 item 4 (sibling): a model directory's config.json nested past the recursion limit is exit 2 naming
    it (was a RecursionError traceback): every JSON a user hands the engine goes through one parser."""
    (in_tmp / "m").mkdir()
    (in_tmp / "m" / "config.json").write_text('{"model_type": ' + "[" * 100_000 + "]" * 100_000 + "}")
    (in_tmp / "bad.yaml").write_text("model:\n  name_or_path: m\n" + D)
    rc, _, err = cli("validate", "bad.yaml")
    assert rc == 2 and "Traceback" not in err, err
    assert f"{in_tmp / 'm' / 'config.json'} is not a valid HF config (not valid JSON (nested deeper than" in err, err


# ------------------------------------------------------------------------------------ issue 19 (16): small ones


@pytest.mark.parametrize("setting, says", [
    ("eval.every_n_steps=0", "eval.every_n_steps: must be at least 1 (got 0); for no periodic evaluation write null "
                             "(or leave it out): evaluation then runs once, at the end"),
    # the class: every bounded field that may be null says so; one that may not does not
    ("checkpoint.keep_last=0", "checkpoint.keep_last: Input should be greater than or equal to 1 (got 0); or null to "
                               "leave it unset"),
    ("trainer.max_steps=-3", "trainer.max_steps: Input should be greater than or equal to 1 (got -3); or null to "
                             "leave it unset"),
])
def test_a_zero_where_null_is_allowed_suggests_null(good_yaml, cli, setting, says):
    rc, _, err = cli("validate", str(good_yaml), "--set", setting)
    assert rc == 2 and says in err


def test_a_zero_where_null_is_not_allowed_does_not_suggest_it(good_yaml, cli):
    rc, _, err = cli("validate", str(good_yaml), "--set", "eval.max_new_tokens=0")
    assert rc == 2 and "greater than or equal to 1 (got 0)" in err and "null" not in err


def test_inspect_data_help_describes_n(cli):
    rc, out, _ = cli("inspect-data", "--help")
    assert rc == 0
    flat = " ".join(out.split())
    assert "--n N how many training items to show, in training order (default 1; 0 prints the counts only)" in flat
    rc, out, _ = cli("--help")
    assert "inspect-data CONFIG [--n N]" in out
