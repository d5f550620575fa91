"""What the recipes (configs/*.py) share, written once; each recipe then shows what makes it that recipe.

Every field the code reads is in the config a recipe returns, with its default from here: the
code reads `config.section.field` and holds no second default. Sections a run may lack on
purpose are `latent` and `text` (only models trained on an encoded dataset have them: they
are filled from its metadata, diffusion_jax.data.encoded.record_conditioners).
"""
import ml_collections

# Logical axis -> mesh axes for every logical name the models use (models/*.py name logical axes
# only). Rows of every batch split over data and fsdp; weights' embed / channels axes over fsdp;
# the MLP and heads over tensor; everything else whole.
LOGICAL_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),  # ("length", "tensor") shards long sequences; attention gathers K/V
    ("text_length", None),
    ("embed", "fsdp"),
    ("embed_out", None),
    ("text_embed", None),
    ("mlp", "tensor"),
    # adaLN outputs stay whole: XLA's CPU SPMD partitioner miscomputes the split of a
    # tensor-sharded modulation on a (2, 2, 2) mesh (tests/test_train.py checks that mesh).
    ("modulation", None),
    ("heads", "tensor"),
    ("kv", None),
    ("patch", None),
    ("classes", None),
    ("layers", None),
    ("channels", "fsdp"),  # the U-Net's conv output channels (models/unet.py LOGICAL_NAMES)
    ("channels_in", None),
    ("context", None),
    ("kernel_t", None),  # the VAE's conv kernels (models/vae.py)
    ("kernel_h", None),
    ("kernel_w", None),
)


def logical_rules(**overrides) -> tuple:
  """LOGICAL_RULES with some names mapped elsewhere, e.g. logical_rules(channels=None)."""
  unknown = set(overrides) - {name for name, _ in LOGICAL_RULES}
  if unknown:
    raise ValueError(f"no logical axes {sorted(unknown)} in config_defaults.LOGICAL_RULES")
  return tuple((name, overrides.get(name, axes)) for name, axes in LOGICAL_RULES)


DATA = dict(
    data_dir="",  # "" = $DIFFUSION_JAX_DATA or ~/.cache/diffusion_jax/data
    split="train",
    eval_split="validation",
    builder={},  # built-in builder arguments (the builder modules of diffusion_jax/data/); {} = its defaults
    shuffle_seed=0,
    num_workers=0,  # Grain worker processes (0 = in the main process)
    read_threads=16,  # Grain's reader threads per process (0 = read in the main thread; pipeline.read_options)
)

# The packed-row pipeline of the diffusion task (diffusion_jax/data/pipeline.py).
PACKED_DATA = dict(
    fixed_size=False,  # True: every example is image_size x image_size (a U-Net's one grid, class grids)
    image_size=0,  # the side of a fixed-size model's examples (pixels, or latents of an encoded dataset)
    text_tokens_per_row=0,  # Lt: packed caption tokens per row; 0 = no captions
    max_frames=0,  # 0 = no limit before packing
    max_area=0,  # pixels; 0 = no limit
    pack_buffer=32,  # examples the best-fit packer looks ahead over
    pack_open_rows=8,
    cache_examples=False,  # keep every decoded record of this process's shard in memory (small datasets)
)

TRAIN = dict(
    seed=0,
    optimizer="adamw",  # or "muon": Muon on the transformer blocks' matrices, AdamW on the rest (train/state.py)
    muon_lr_scale=1.0,  # muon: Muon's rate is this times the schedule's (AdamW's part keeps it)
    lr_schedule="constant",  # or "cosine", or "wsd" (constant, then a linear cooldown), after the linear warmup
    cooldown_fraction=0.2,  # wsd: the last fraction of the steps, over which the rate falls linearly to 0
    weight_decay=0.0,
    grad_clip=1.0,
    ema_decay=0.999,
    compute_dtype="float32",  # or bfloat16 (params stay float32)
    keep_ckpts=3,
    grad_accum_steps=1,  # micro-batches per step (a lax.scan); the update is the global batch's
    max_consecutive_skips=20,  # stop after this many non-finite updates in a row (0 = never)
    eval_every=0,  # held-out metrics of the EMA params every this many steps; 0 = off
    eval_batches=4,  # the fixed eval set: this many batches of data.eval_split
    eval_media=True,  # diffusion models: at eval steps, samples of sample.prompts / fixed classes into TensorBoard
    profile_steps=(0, 0),  # (start, stop): trace steps start+1..stop into WORKDIR/profile; equal = off
)

MESH = dict(
    shape=(-1, 1, 1),  # -1 takes the rest of the devices
    axes=("data", "fsdp", "tensor"),
    rules=LOGICAL_RULES,
)

# The diffusion task's backbone (train/dit_task.py); the U-Net reads the fields it has.
DIFFUSION_MODEL = dict(
    family="dit",  # dit | unet
    num_classes=0,  # 0 = unconditional or captions; label num_classes is the null class (CFG)
    class_dropout_prob=0.1,
    text_dim=0,  # caption-embedding width for cross-attention; 0 = none
    caption_dropout_prob=0.1,  # the null caption, for classifier-free guidance
    pooled_text=False,  # with text: the mean caption token joins the conditioning too (SD3)
    learn_sigma=True,  # Improved DDPM's learned variance (DDPM objective only)
    mlp_ratio=4.0,
    pos_embedding="sincos2d",  # sincos2d | sincos3d | rope3d
    qk_norm=False,
    adaln="zero",  # DiT's adaLN-Zero; "single": PixArt-alpha's shared one
    attention_backend="xla",  # xla | gpu | splash
    scan_layers=True,
    scan_unroll=0,  # layers per loop iteration; 0 = auto: unrolled on CPU (faster there), a loop elsewhere
    remat="none",  # none | full | dots
)

DIFFUSION = dict(
    kind="ddpm",  # ddpm | flow (rectified flow)
    schedule="linear",  # ddpm: linear | quadratic | cosine
    num_steps=1000,
    prediction="eps",  # ddpm: eps | v | x0
    logit_mean=0.0,  # flow: logit-normal training times
    logit_std=1.0,
    shift_base_tokens=0,  # flow: t-shift s = sqrt(tokens of the example / this); 0 = no shift
    cond={},  # training probabilities of conditioning-frame modes (i2v, extend, interpolate, random)
)

# A prompt-conditioned diffusion model's conditioners, empty in the recipe: filled at train time from
# the encoded dataset's metadata (data.encoded.record_conditioners) and saved with every checkpoint:
# the VAE to decode with, the latent normalisation, the text encoder.
CONDITIONERS = dict(latent=dict(vae="", mean=(), std=()), text=dict(encoder_dir="", max_length=32))

SAMPLE = dict(sampler="ddim", steps=50, eta=0.0, cfg_scale=4.0, seed=0, rows_per_call=4)


def recipe(task: str, **sections) -> ml_collections.ConfigDict:
  """A config of `task` from the shared sections, each updated by the recipe's own fields.

  data, train and mesh always; for the diffusion task also the packed data, model, diffusion
  and sample sections. A section not shared (the VAE's loss, latent, text) comes as it is given.
  """
  shared = dict(data=DATA, train=TRAIN, mesh=MESH)
  if task == "dit":
    shared.update(data={**DATA, **PACKED_DATA}, model=DIFFUSION_MODEL, diffusion=DIFFUSION, sample=SAMPLE)
  config = ml_collections.ConfigDict()
  config.task = task
  for name in dict.fromkeys([*shared, *sections]):
    config[name] = {**shared.get(name, {}), **sections.get(name, {})}
  return config
