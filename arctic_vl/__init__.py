"""arctic_vl: a training engine for vision-language models.

This module IS the plugin API: everything a plugin (a project under `projects/` or a third-party package)
may use is exported here, each with a docstring that states its contract. Projects import nothing else
from the core; where they need more, the API grows here (with a docstring and a test).

The names are imported lazily so `arctic_vl --help` does not pay for torch and transformers.

Groups:
    running:      Engine, EngineConfig, EvalConfig, load_config, load_plugins
    a run's weights: newest_weights, RunWeights (what every verb that reads a run scores or exports)
    registries:   Registry, Component, ComponentConfig, MODELS, DATA, TRAINERS, OPTIMIZERS, SCHEDULERS,
                  CHECKPOINTERS, CALLBACKS, DISTRIBUTED, RECORD_FORMATS, DATA_SOURCES
    extending:    register_cli_verb, register_config_check, register_model_type
    config:       ConfigPath, ModelPath, ExistingPath, Seed, LocatedConfig, where, output_directory, output_file,
                  resolve_user_path, parse_json, JsonTextError
    contracts:    Batch, StepCounts, BOOKKEEPING_KEYS, INDICES, NUM_SAMPLES, NUM_TOKENS, NUM_SLOTS, DROPPED,
                  IGNORE_INDEX, PARTS, epoch_seed
    batch toolkit: prompt_item, answer_start, slice_rows, render_tokens
    models:       ModelFactory, ModelBundle, HFModelFactory, HFModelConfig, LoraConfig, DTYPES, FamilySpec,
                  FAMILIES, get_family, family_of_dir, read_model_type, load_model, load_processor,
                  make_tiny_model, tiny_config, TinyModelConfig
    forward/loss: final_hidden, model_inputs, unwrap_peft, vision_keepalive, lm_loss_sum, label_positions,
                  count_label_tokens, chunked_head_sums, agreed_rows, LEAN_THRESHOLD
    data:         DataFactory, DataBundle, VLMDataFactory, VLMDataConfig, Collator, ITEM_INDEX, ITEM_BAD,
                  Conversation, BadRecord, BadRecordReport, SourceSpec, ImageRef, image_size, open_image,
                  make_synthetic_data, to_norm1000, read_json_lines, is_coordinate
    record formats and data sources (a plugin's own `format:` or file kind):
                  RecordFormat, DataSource, RecordFile, RawRecord, IMAGE_TOKEN, BAD_RECORD_REASONS,
                  INVALID_JSON, MISSING_FIELD, MALFORMED_RECORD, MALFORMED_TURNS, IMAGE_TOKEN_MISMATCH,
                  MISSING_IMAGE, UNREADABLE_IMAGE, IMAGE_TOO_LARGE, UNSUPPORTED_VIDEO, UNRENDERED_PLACEHOLDER,
                  GROUNDING_MISMATCH
    training:     Trainer, TrainerConfig, TrainState, LossOutput, SFTTrainer, normalize_answer, lockstep_generation,
                  Callback, StepInfo, Checkpointer, CheckpointConfig, Optimizer, AdamWConfig,
                  ParamGroupConfig, Scheduler, SchedulerConfig, LRPhase, DistributedBackend, DistributedConfig
    errors:       UserError, ConfigError, DataError (exit 2), RunFailed, CheckpointError (exit 1)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Before anything imports DeepSpeed (transformers does, on every model load): its CPU notice is noise. Imported
# by name like every core module here (the plugin API re-exports; a project's import of arctic_vl reaches no core
# module statically); the module imports only `logging` and `warnings`.
importlib.import_module("arctic_vl.distributed.noise").quiet_accelerator_notice()

#: public name -> the module that defines it
_LAZY: dict[str, str] = {
    # running
    "Engine": "arctic_vl.engine",
    "EngineConfig": "arctic_vl.config.schema",
    "EvalConfig": "arctic_vl.config.schema",
    "load_config": "arctic_vl.config.schema",
    "load_plugins": "arctic_vl.plugins",
    # a run's weights
    "newest_weights": "arctic_vl.checkpoint.checkpointer",
    "RunWeights": "arctic_vl.checkpoint.checkpointer",
    # registries
    "Registry": "arctic_vl.registry",
    "Component": "arctic_vl.registry",
    "ComponentConfig": "arctic_vl.registry",
    "MODELS": "arctic_vl.registry",
    "DATA": "arctic_vl.registry",
    "TRAINERS": "arctic_vl.registry",
    "OPTIMIZERS": "arctic_vl.registry",
    "SCHEDULERS": "arctic_vl.registry",
    "CHECKPOINTERS": "arctic_vl.registry",
    "CALLBACKS": "arctic_vl.registry",
    "DISTRIBUTED": "arctic_vl.registry",
    "RECORD_FORMATS": "arctic_vl.registry",
    "DATA_SOURCES": "arctic_vl.registry",
    # extending
    "register_cli_verb": "arctic_vl.plugins",
    "register_config_check": "arctic_vl.plugins",
    "register_model_type": "arctic_vl.models.families",
    # config
    "ConfigPath": "arctic_vl.config.paths",
    "ModelPath": "arctic_vl.config.paths",
    "ExistingPath": "arctic_vl.config.paths",
    "output_directory": "arctic_vl.config.paths",
    "output_file": "arctic_vl.config.paths",
    "resolve_user_path": "arctic_vl.config.paths",
    "parse_json": "arctic_vl.config.jsontext",
    "JsonTextError": "arctic_vl.config.jsontext",
    "Seed": "arctic_vl.config.types",
    "LocatedConfig": "arctic_vl.config.loader",
    "where": "arctic_vl.config.schema",
    # contracts
    "Batch": "arctic_vl.batch",
    "StepCounts": "arctic_vl.batch",
    "BOOKKEEPING_KEYS": "arctic_vl.batch",
    "INDICES": "arctic_vl.batch",
    "NUM_SAMPLES": "arctic_vl.batch",
    "NUM_TOKENS": "arctic_vl.batch",
    "NUM_SLOTS": "arctic_vl.batch",
    "DROPPED": "arctic_vl.batch",
    "prompt_item": "arctic_vl.batchkit",
    "answer_start": "arctic_vl.batchkit",
    "render_tokens": "arctic_vl.batchkit",
    "slice_rows": "arctic_vl.batchkit",
    "IGNORE_INDEX": "arctic_vl.constants",
    "PARTS": "arctic_vl.constants",
    "epoch_seed": "arctic_vl.constants",
    # models
    "ModelFactory": "arctic_vl.models.base",
    "ModelBundle": "arctic_vl.models.base",
    "HFModelFactory": "arctic_vl.models.hf",
    "HFModelConfig": "arctic_vl.models.hf",
    "DTYPES": "arctic_vl.models.hf",
    "read_model_type": "arctic_vl.models.hf",
    "LoraConfig": "arctic_vl.models.lora",
    "FamilySpec": "arctic_vl.models.families",
    "FAMILIES": "arctic_vl.models.families",
    "get_family": "arctic_vl.models.families",
    "family_of_dir": "arctic_vl.models.loading",
    "load_model": "arctic_vl.models.loading",
    "load_processor": "arctic_vl.models.loading",
    "make_tiny_model": "arctic_vl.models.tiny",
    "tiny_config": "arctic_vl.models.tiny",
    "TinyModelConfig": "arctic_vl.models.tiny",
    # forward and loss helpers
    "final_hidden": "arctic_vl.models.forward",
    "model_inputs": "arctic_vl.models.forward",
    "unwrap_peft": "arctic_vl.models.forward",
    "vision_keepalive": "arctic_vl.models.forward",
    "lm_loss_sum": "arctic_vl.trainers.loss",
    "label_positions": "arctic_vl.trainers.loss",
    "count_label_tokens": "arctic_vl.trainers.loss",
    "chunked_head_sums": "arctic_vl.trainers.loss",
    "agreed_rows": "arctic_vl.trainers.loss",
    "LEAN_THRESHOLD": "arctic_vl.trainers.loss",
    # data
    "DataFactory": "arctic_vl.data.base",
    "DataBundle": "arctic_vl.data.base",
    "VLMDataFactory": "arctic_vl.data.factory",
    "VLMDataConfig": "arctic_vl.data.factory",
    "Conversation": "arctic_vl.data.records",
    "BadRecord": "arctic_vl.data.bad_records",
    "BadRecordReport": "arctic_vl.data.bad_records",
    "to_norm1000": "arctic_vl.data.records",
    "is_coordinate": "arctic_vl.data.records",
    "Collator": "arctic_vl.data.collate",
    "ITEM_INDEX": "arctic_vl.data.collate",
    "ITEM_BAD": "arctic_vl.data.collate",
    "SourceSpec": "arctic_vl.data.sources",
    "read_json_lines": "arctic_vl.data.sources",
    "ImageRef": "arctic_vl.data.images",
    "image_size": "arctic_vl.data.images",
    "open_image": "arctic_vl.data.images",
    "make_synthetic_data": "arctic_vl.data.synthetic",
    # record formats and data sources
    "RecordFormat": "arctic_vl.data.records",
    "IMAGE_TOKEN": "arctic_vl.data.records",
    "DataSource": "arctic_vl.data.sources",
    "RecordFile": "arctic_vl.data.sources",
    "RawRecord": "arctic_vl.data.sources",
    "BAD_RECORD_REASONS": "arctic_vl.data.bad_records",
    "INVALID_JSON": "arctic_vl.data.bad_records",
    "MISSING_FIELD": "arctic_vl.data.bad_records",
    "MALFORMED_RECORD": "arctic_vl.data.bad_records",
    "MALFORMED_TURNS": "arctic_vl.data.bad_records",
    "IMAGE_TOKEN_MISMATCH": "arctic_vl.data.bad_records",
    "MISSING_IMAGE": "arctic_vl.data.bad_records",
    "UNREADABLE_IMAGE": "arctic_vl.data.bad_records",
    "IMAGE_TOO_LARGE": "arctic_vl.data.bad_records",
    "UNSUPPORTED_VIDEO": "arctic_vl.data.bad_records",
    "UNRENDERED_PLACEHOLDER": "arctic_vl.data.bad_records",
    "GROUNDING_MISMATCH": "arctic_vl.data.bad_records",
    # training
    "Trainer": "arctic_vl.trainers.base",
    "TrainerConfig": "arctic_vl.trainers.base",
    "TrainState": "arctic_vl.trainers.base",
    "LossOutput": "arctic_vl.trainers.base",
    "SFTTrainer": "arctic_vl.trainers.sft",
    "normalize_answer": "arctic_vl.trainers.evaluate",
    "lockstep_generation": "arctic_vl.trainers.evaluate",
    "Callback": "arctic_vl.callbacks.base",
    "StepInfo": "arctic_vl.callbacks.base",
    "Checkpointer": "arctic_vl.checkpoint.checkpointer",
    "CheckpointConfig": "arctic_vl.checkpoint.checkpointer",
    "Optimizer": "arctic_vl.optim.optimizers",
    "AdamWConfig": "arctic_vl.optim.optimizers",
    "ParamGroupConfig": "arctic_vl.optim.optimizers",
    "Scheduler": "arctic_vl.optim.schedulers",
    "SchedulerConfig": "arctic_vl.optim.schedulers",
    "LRPhase": "arctic_vl.optim.schedulers",
    "DistributedBackend": "arctic_vl.distributed.backends",
    "DistributedConfig": "arctic_vl.distributed.backends",
    # errors
    "UserError": "arctic_vl.errors",
    "ConfigError": "arctic_vl.errors",
    "DataError": "arctic_vl.errors",
    "CheckpointError": "arctic_vl.errors",
    "RunFailed": "arctic_vl.errors",
}

__all__ = [  # every public name; tests/test_api.py checks it equals the keys of _LAZY
    "BAD_RECORD_REASONS",
    "BOOKKEEPING_KEYS",
    "CALLBACKS",
    "CHECKPOINTERS",
    "DATA",
    "DATA_SOURCES",
    "DISTRIBUTED",
    "DROPPED",
    "DTYPES",
    "FAMILIES",
    "GROUNDING_MISMATCH",
    "IGNORE_INDEX",
    "IMAGE_TOKEN",
    "IMAGE_TOKEN_MISMATCH",
    "IMAGE_TOO_LARGE",
    "INDICES",
    "INVALID_JSON",
    "ITEM_BAD",
    "ITEM_INDEX",
    "LEAN_THRESHOLD",
    "MALFORMED_RECORD",
    "MALFORMED_TURNS",
    "MISSING_FIELD",
    "MISSING_IMAGE",
    "MODELS",
    "NUM_SAMPLES",
    "NUM_SLOTS",
    "NUM_TOKENS",
    "OPTIMIZERS",
    "PARTS",
    "RECORD_FORMATS",
    "SCHEDULERS",
    "TRAINERS",
    "UNREADABLE_IMAGE",
    "UNRENDERED_PLACEHOLDER",
    "UNSUPPORTED_VIDEO",
    "AdamWConfig",
    "BadRecord",
    "BadRecordReport",
    "Batch",
    "Callback",
    "CheckpointConfig",
    "CheckpointError",
    "Checkpointer",
    "Collator",
    "Component",
    "ComponentConfig",
    "ConfigError",
    "ConfigPath",
    "Conversation",
    "DataBundle",
    "DataError",
    "DataFactory",
    "DataSource",
    "DistributedBackend",
    "DistributedConfig",
    "Engine",
    "EngineConfig",
    "EvalConfig",
    "ExistingPath",
    "FamilySpec",
    "HFModelConfig",
    "HFModelFactory",
    "ImageRef",
    "JsonTextError",
    "LRPhase",
    "LocatedConfig",
    "LoraConfig",
    "LossOutput",
    "ModelBundle",
    "ModelFactory",
    "ModelPath",
    "Optimizer",
    "ParamGroupConfig",
    "RawRecord",
    "RecordFile",
    "RecordFormat",
    "Registry",
    "RunFailed",
    "RunWeights",
    "SFTTrainer",
    "Scheduler",
    "SchedulerConfig",
    "Seed",
    "SourceSpec",
    "StepCounts",
    "StepInfo",
    "TinyModelConfig",
    "TrainState",
    "Trainer",
    "TrainerConfig",
    "UserError",
    "VLMDataConfig",
    "VLMDataFactory",
    "agreed_rows",
    "answer_start",
    "chunked_head_sums",
    "count_label_tokens",
    "epoch_seed",
    "family_of_dir",
    "final_hidden",
    "get_family",
    "image_size",
    "is_coordinate",
    "label_positions",
    "lm_loss_sum",
    "load_config",
    "load_model",
    "load_plugins",
    "load_processor",
    "lockstep_generation",
    "make_synthetic_data",
    "make_tiny_model",
    "model_inputs",
    "newest_weights",
    "normalize_answer",
    "open_image",
    "output_directory",
    "output_file",
    "parse_json",
    "prompt_item",
    "read_json_lines",
    "read_model_type",
    "register_cli_verb",
    "register_config_check",
    "register_model_type",
    "render_tokens",
    "resolve_user_path",
    "slice_rows",
    "tiny_config",
    "to_norm1000",
    "unwrap_peft",
    "vision_keepalive",
    "where",
]

if TYPE_CHECKING:  # pragma: no cover
    from arctic_vl.batch import (
        BOOKKEEPING_KEYS,
        DROPPED,
        INDICES,
        NUM_SAMPLES,
        NUM_SLOTS,
        NUM_TOKENS,
        Batch,
        StepCounts,
    )
    from arctic_vl.batchkit import answer_start, prompt_item, render_tokens, slice_rows
    from arctic_vl.callbacks.base import Callback, StepInfo
    from arctic_vl.checkpoint.checkpointer import CheckpointConfig, Checkpointer, RunWeights, newest_weights
    from arctic_vl.config.jsontext import JsonTextError, parse_json
    from arctic_vl.config.loader import LocatedConfig
    from arctic_vl.config.paths import (
        ConfigPath,
        ExistingPath,
        ModelPath,
        output_directory,
        output_file,
        resolve_user_path,
    )
    from arctic_vl.config.schema import EngineConfig, EvalConfig, load_config, where
    from arctic_vl.config.types import Seed
    from arctic_vl.constants import IGNORE_INDEX, PARTS, epoch_seed
    from arctic_vl.data.bad_records import (
        BAD_RECORD_REASONS,
        GROUNDING_MISMATCH,
        IMAGE_TOKEN_MISMATCH,
        IMAGE_TOO_LARGE,
        INVALID_JSON,
        MALFORMED_RECORD,
        MALFORMED_TURNS,
        MISSING_FIELD,
        MISSING_IMAGE,
        UNREADABLE_IMAGE,
        UNRENDERED_PLACEHOLDER,
        UNSUPPORTED_VIDEO,
        BadRecord,
        BadRecordReport,
    )
    from arctic_vl.data.base import DataBundle, DataFactory
    from arctic_vl.data.collate import ITEM_BAD, ITEM_INDEX, Collator
    from arctic_vl.data.factory import VLMDataConfig, VLMDataFactory
    from arctic_vl.data.images import ImageRef, image_size, open_image
    from arctic_vl.data.records import IMAGE_TOKEN, Conversation, RecordFormat, is_coordinate, to_norm1000
    from arctic_vl.data.sources import DataSource, RawRecord, RecordFile, SourceSpec, read_json_lines
    from arctic_vl.data.synthetic import make_synthetic_data
    from arctic_vl.distributed.backends import DistributedBackend, DistributedConfig
    from arctic_vl.engine import Engine
    from arctic_vl.errors import CheckpointError, ConfigError, DataError, RunFailed, UserError
    from arctic_vl.models.base import ModelBundle, ModelFactory
    from arctic_vl.models.families import FAMILIES, FamilySpec, get_family, register_model_type
    from arctic_vl.models.forward import final_hidden, model_inputs, unwrap_peft, vision_keepalive
    from arctic_vl.models.hf import DTYPES, HFModelConfig, HFModelFactory, read_model_type
    from arctic_vl.models.loading import family_of_dir, load_model, load_processor
    from arctic_vl.models.lora import LoraConfig
    from arctic_vl.models.tiny import TinyModelConfig, make_tiny_model, tiny_config
    from arctic_vl.optim.optimizers import AdamWConfig, Optimizer, ParamGroupConfig
    from arctic_vl.optim.schedulers import LRPhase, Scheduler, SchedulerConfig
    from arctic_vl.plugins import load_plugins, register_cli_verb, register_config_check
    from arctic_vl.registry import (
        CALLBACKS,
        CHECKPOINTERS,
        DATA,
        DATA_SOURCES,
        DISTRIBUTED,
        MODELS,
        OPTIMIZERS,
        RECORD_FORMATS,
        SCHEDULERS,
        TRAINERS,
        Component,
        ComponentConfig,
        Registry,
    )
    from arctic_vl.trainers.base import LossOutput, Trainer, TrainerConfig, TrainState
    from arctic_vl.trainers.evaluate import lockstep_generation, normalize_answer
    from arctic_vl.trainers.loss import (
        LEAN_THRESHOLD,
        agreed_rows,
        chunked_head_sums,
        count_label_tokens,
        label_positions,
        lm_loss_sum,
    )
    from arctic_vl.trainers.sft import SFTTrainer


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'arctic_vl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
