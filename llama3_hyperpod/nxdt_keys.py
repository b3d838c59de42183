"""The config keys NxDT and the libraries it hands sections to really read, so a typo is caught and a real key is not.

How strict a section can be is decided by what NxDT does with it (NxDT at aws-neuron/neuronx-distributed-training
9169aa0, NeMo 2.1.0 and its exp_manager, PyTorch Lightning 2.5.0):
- `trainer` is splatted into `NLPTrainer(plugins=..., strategy=..., **cfg.trainer)` (examples/training.py:61), so a key
  that is not a parameter of NLPTrainer.__init__ (lightning_modules/nlp_overrides.py:888-938) is a TypeError there.
- `exp_manager` is merged into the structured `ExpManagerConfig` (utils/exp_manager.py:183-188: NxDT's subclass of
  NeMo's nemo/utils/exp_manager.py:179, `checkpoint_callback_params` NeMo's CallbackParams at line 106 plus NxDT's
  fields at exp_manager.py:40-61), so an unknown key fails there too.
- Every other section is read with `.get(...)` or searched by name anywhere in the tree (utils/utils.py:79,
  get_attribute_from_cfg): an unknown key is ignored. There we refuse what looks like a typo of a known key and let
  anything else through with a warning (NxDT receives the user's YAML unchanged either way).
The lenient sets are the union of the keys of NxDT's own example configs (examples/conf/*.yaml, 26 files) and the
keys its code reads with `.get(...)` (src/ and examples/); the project's own section `torch_backend` is ours.
"""

from __future__ import annotations

import difflib


def _keys(text: str) -> frozenset[str]:
    return frozenset(text.split())

# Sections whose unknown keys NxDT itself rejects. Values: the keys of that section.
STRICT: dict[str, frozenset[str]] = {
    # NLPTrainer.__init__ (nlp_overrides.py:888-938) minus `plugins` and `strategy`, which training.py:61 passes.
    "trainer": _keys("""
    logger enable_checkpointing callbacks default_root_dir gradient_clip_val gradient_clip_algorithm num_nodes
    num_processes devices enable_progress_bar overfit_batches track_grad_norm check_val_every_n_epoch
    fast_dev_run accumulate_grad_batches max_epochs min_epochs max_steps min_steps max_time
    limit_train_batches limit_val_batches limit_test_batches limit_predict_batches val_check_interval
    log_every_n_steps accelerator sync_batchnorm precision enable_model_summary num_sanity_val_steps profiler
    benchmark deterministic reload_dataloaders_every_n_epochs auto_lr_find detect_anomaly
    auto_scale_batch_size move_metrics_to_cpu multiple_trainloader_mode inference_mode lnc
    sequential_move_factor barebones use_distributed_sampler
"""),
    # NeMo 2.1.0 ExpManagerConfig (nemo/utils/exp_manager.py:179-237) + NxDT's ExpManagerConfig (exp_manager.py:51-61).
    "exp_manager": _keys("""
    explicit_log_dir exp_dir name version use_datetime_version resume_if_exists resume_past_end
    resume_ignore_no_checkpoint resume_from_checkpoint create_tensorboard_logger summary_writer_kwargs
    create_wandb_logger wandb_logger_kwargs create_mlflow_logger mlflow_logger_kwargs create_dllogger_logger
    dllogger_logger_kwargs create_clearml_logger clearml_logger_kwargs create_neptune_logger
    neptune_logger_kwargs create_checkpoint_callback checkpoint_callback_params create_early_stopping_callback
    early_stopping_callback_params create_preemption_callback files_to_copy log_step_timing
    log_delta_step_timing step_timing_kwargs log_local_rank_0_only log_global_rank_0_only
    disable_validation_on_resume ema max_time_per_run seconds_to_sleep create_straggler_detection_callback
    straggler_detection_params create_fault_tolerance_callback fault_tolerance log_tflops_per_sec_per_gpu
    log_parameter_norm log_gradient_norm enable_recovery_time_instrumentation save_xser load_xser save_bf16
    async_checkpointing ckpt_ptl_version
"""),
    # NeMo 2.1.0 CallbackParams (exp_manager.py:106-128) + NxDT's CallbackParams (exp_manager.py:40-48).
    "exp_manager.checkpoint_callback_params": _keys("""
    filepath dirpath filename monitor verbose save_last save_top_k save_weights_only mode
    auto_insert_metric_name every_n_epochs every_n_train_steps train_time_interval prefix postfix
    save_best_model always_save_nemo save_nemo_on_train_end model_parallel_size save_on_train_epoch_end
    async_save save_last_n_optim_states use_master_weights_in_ckpt enable_version_counter
"""),
}

# Sub-sections of strict sections that hold free-form or nested dataclass settings: not checked key by key.
OPEN_SUBSECTIONS = frozenset({
    "trainer.logger", "trainer.callbacks", "trainer.profiler", "trainer.max_time",
    "exp_manager.summary_writer_kwargs", "exp_manager.wandb_logger_kwargs", "exp_manager.mlflow_logger_kwargs",
    "exp_manager.dllogger_logger_kwargs", "exp_manager.clearml_logger_kwargs", "exp_manager.neptune_logger_kwargs",
    "exp_manager.early_stopping_callback_params", "exp_manager.step_timing_kwargs", "exp_manager.ema",
    "exp_manager.straggler_detection_params", "exp_manager.fault_tolerance", "exp_manager.files_to_copy",
})

# Keys NxDT reads (or its example configs carry) in the sections it reads leniently, as dotted paths.
LENIENT: frozenset[str] = _keys("""
    name model_source seed trainer exp_manager distributed_strategy data model precision compiler_flags
    compiler_cache_url aync_exec_max_inflight_requests bucket_size_collectives neuron_rt_exec_timeout
    neuron_experimental_compress_rg model_alignment_strategy torch_backend
    distributed_strategy.tensor_model_parallel_size distributed_strategy.pipeline_model_parallel_size
    distributed_strategy.virtual_pipeline_model_parallel_size distributed_strategy.context_parallel_size
    distributed_strategy.zero1 distributed_strategy.sequence_parallel distributed_strategy.kv_replicator
    distributed_strategy.expert_model_parallel_size distributed_strategy.pipeline_model_parallel_split_rank
    distributed_strategy.token_shuffle_group_size data.micro_batch_size data.global_batch_size data.train_dir
    data.val_dir data.test_dir data.tokenizer data.tokenizer.type data.tokenizer.library data.tokenizer.model
    data.tokenizer.vocab_file data.tokenizer.merge_file data.tokenizer.delimiter
    data.tokenizer.sentencepiece_legacy data.tokenizer.use_fast data.data_prefix data.data_impl
    data.splits_string data.seq_length data.skip_warmup data.num_workers data.dataloader_type
    data.reset_position_ids data.reset_attention_mask data.eod_mask_loss data.validation_drop_last
    data.no_seqlen_plus_one_input_tokens data.pad_samples_to_global_batch_size data.index_mapping_dir
    data.dev_choose_samples data.packing data.use_sft_style_data_module data.drop_last data.fine_tuning
    data.test_ds data.test_ds.file_names data.validation_ds data.validation_ds.file_names model.model_config
    model.encoder_seq_length model.max_position_embeddings model.num_layers model.hidden_size model.rope_theta
    model.qkv_linear model.fuse_qkv model.transpose_nki_inputs model.pipeline_cuts model.persistent_workers
    model.transformer_engine model.use_cpu_initialization model.weight_init_only
    model.activations_checkpoint_granularity model.activations_checkpoint_recompute
    model.activations_checkpoint_method model.activations_checkpoint_num_layers
    model.activations_checkpoint_layers_per_pipeline
    model.num_micro_batches_with_partial_activation_checkpoints model.disable_layer_norm_checkpointing
    model.fusions model.fusions.softmax model.fusions.flash_attention model.fusions.ring_attention
    model.fusions.do_layer_norm_weight_decay model.do_layer_norm_weight_decay model.optim model.optim.name
    model.optim.lr model.optim.weight_decay model.optim.capturable model.optim.betas model.optim.eps
    model.optim.sched model.optim.sched.name model.optim.sched.warmup_steps model.optim.sched.max_steps
    model.optim.sched.min_lr model.optim.sched.constant_steps model.ffn_hidden_size model.num_attention_heads
    model.num_kv_heads model.init_method_std model.use_scaled_init_method model.hidden_dropout
    model.attention_dropout model.ffn_dropout model.kv_channels model.apply_query_key_layer_scaling
    model.normalization model.layernorm_epsilon model.make_vocab_size_divisible_by model.persist_layer_norm
    model.share_embeddings_and_output_weights model.position_embedding_type model.rotary_percentage
    model.activation model.transformer_block_type model.has_bias model.bias_activation_fusion
    model.bias_dropout_add_fusion model.gradient_accumulation_fusion model.masked_softmax_fusion
    model.use_emha model.position_abf_factor model.position_freq_base model.positition_interpolation_factor
    model.precision model.save_logits model.sliding_window_size model.moe model.moe.num_experts
    model.moe.top_k model.moe.capacity_factor model.moe.dropless model.moe.dropout model.moe.frequency
    model.moe.glu_mlp model.moe.normalize_top_k_affinities model.moe.output_router_logits
    model.moe.router_activation model.moe.router_aux_loss_coef model.moe.routing_algorithm
    model.moe.sinkhorn_iterations model.moe.sinkhorn_tol precision.type precision.master_weights
    precision.fp32_grad_acc precision.fp32_grads_cc precision.xla_use_bf16 precision.xla_downcast_bf16
    precision.neuron_rt_stochastic_rounding_en precision.parallel_layers_reduce_dtype
    model_alignment_strategy.sft model_alignment_strategy.sft.packing model_alignment_strategy.dpo
    model_alignment_strategy.dpo.kl_beta model_alignment_strategy.dpo.loss_type
    model_alignment_strategy.dpo.max_prompt_length model_alignment_strategy.dpo.precompute_ref_log_probs
    model_alignment_strategy.dpo.truncation_mode model_alignment_strategy.orpo
    model_alignment_strategy.orpo.beta model_alignment_strategy.orpo.max_prompt_length
    model_alignment_strategy.orpo.truncation_mode model_alignment_strategy.peft
    model_alignment_strategy.peft.lora_rank model_alignment_strategy.peft.lora_alpha
    model_alignment_strategy.peft.lora_dropout model_alignment_strategy.peft.lora_bias
    model_alignment_strategy.peft.lora_verbose model_alignment_strategy.peft.target_modules
    model_alignment_strategy.peft.load_lora_from_ckpt model_alignment_strategy.peft.save_lora_base
    model_alignment_strategy.peft.merge_lora model_alignment_strategy.peft.save_lora_config_adapter
    model_alignment_strategy.peft.merge_sharded_lora torch_backend.compile torch_backend.peak_tflops
    torch_backend.shuffle
""")

# Below these, values are free-form mappings or lists (a data_prefix dict, tokenizer options): not checked.
OPEN_LENIENT = frozenset({"data.data_prefix", "data.test_ds", "data.validation_ds", "model.pipeline_cuts"})
OPEN = OPEN_SUBSECTIONS | OPEN_LENIENT

# Our own section: NxDT never reads it, so nothing but our keys belongs there.
STRICT["torch_backend"] = frozenset({"compile", "peak_tflops", "shuffle"})

TYPO_CUTOFF = 0.8  # difflib ratio at or above which an unknown key is taken for a misspelling of a known one


class UnknownKeyError(Exception):
    """A key that would be rejected (strict section) or that misspells a known one: the key and the suggestion."""

    def __init__(self, dotted: str, suggestion: str | None) -> None:
        super().__init__(dotted)
        self.dotted = dotted
        self.suggestion = suggestion


def is_known(dotted: str) -> bool:
    """True for a key NxDT (or our torch_backend) reads, and for anything inside a free-form value."""
    if any(dotted.startswith(p + ".") for p in OPEN):
        return True
    parent, _, leaf = dotted.rpartition(".")
    if parent in STRICT:
        return leaf in STRICT[parent]
    return dotted in LENIENT or dotted in STRICT


def siblings(parent: str) -> list[str]:
    """The known keys directly under `parent` ('' for the top level), for suggestions."""
    if parent in STRICT:
        return sorted(STRICT[parent])
    depth = parent.count(".") + 1 if parent else 0
    prefix = f"{parent}." if parent else ""
    return sorted({k.split(".")[depth] for k in LENIENT if k.startswith(prefix) and k.count(".") >= depth})


def nearest(parent: str, leaf: str) -> str | None:
    """The dotted known key under `parent` that `leaf` most likely misspells."""
    close = difflib.get_close_matches(leaf, siblings(parent), n=1, cutoff=0.6)
    if not close:
        return None
    return f"{parent}.{close[0]}" if parent else close[0]


def check_key(dotted: str) -> str | None:
    """None for a known key; a warning for an unknown key NxDT ignores. Raises UnknownKeyError for a key in a strict
    section (NxDT would fail on it) and for a near-miss of a known key (a typo that would silently do nothing)."""
    if is_known(dotted):
        return None
    parent, _, leaf = dotted.rpartition(".")
    suggestion = nearest(parent, leaf)
    if parent in STRICT:
        raise UnknownKeyError(dotted, suggestion)
    if suggestion is not None and difflib.SequenceMatcher(None, leaf, suggestion.rpartition(".")[2]).ratio() \
            >= TYPO_CUTOFF:
        raise UnknownKeyError(dotted, suggestion)
    return f"{dotted}: not a key NxDT reads; passed to NxDT unchanged (it ignores unknown keys)"
