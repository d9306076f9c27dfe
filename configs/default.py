"""The paper's recipe (BroadFace, ECCV 2020, section 4.1).

IResNet-100, 512-d BN-FC-BN head, ArcFace (s=64, m=0.5), 128 images per
device, a queue of 8,192 embeddings per device with compensation, SGD with
momentum 0.9 and weight decay 5e-4, lr 5e-3 / 5e-4 / 5e-5 with steps at 50k
and 70k, 80k steps in all, warm-started from an ArcFace-trained checkpoint
(`config.init_from`).

Every other config starts from this one and changes a few fields, so that the
full list of fields lives in one place. Unknown fields are an error
(ml_collections locks the config).
"""

import ml_collections
from ml_collections import config_dict

from broadface_jax import losses  # light: the registry only (no JAX)


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    # ---- model: broadface_jax.models.build_encoder(config.model)
    c.model = ml_collections.ConfigDict()
    c.model.name = "iresnet100"  # iresnet18/34/50/100/200, mobilefacenet, resnet50
    c.model.embedding_dim = 512
    c.model.width = 1.0  # width multiplier (tiny CPU models use e.g. 0.125)
    c.model.dropout = 0.0
    c.model.dtype = "float32"  # compute dtype of the encoder: float32 | bfloat16
    # train-mode BatchNorm statistics: global (over the global batch: an all-reduce per BN
    # layer, forward and backward) | per_device (each device's rows, as arcface_torch's
    # per-GPU BN under DDP; running stats = mean over devices). Eval mode is the same.
    c.model.batch_norm = "global"

    # ---- loss: broadface_jax.losses.REGISTRY, used for the batch and the queue terms
    #   arcface         s * cos(theta_y + m2)                      uses s, m2 (default 0.5)
    #   cosface         s * (cos(theta_y) - m3)                    uses s, m3 (default 0.35)
    #   combined        s * (cos(m1 * theta_y + m2) - m3)          uses s, m1, m2, m3
    #                                                              (defaults 1.0, 0.3, 0.2)
    #   curricularface  ArcFace target, hard negatives cos(t + cos), t an EMA of the
    #                   mean positive cosine (state in TrainState.loss_state)
    #                                                              uses s, m2 (default 0.5)
    # One field per hyperparameter a registered loss declares (losses.REGISTRY: today m1, m2,
    # m3): None takes the loss's default; setting one the loss does not use is an error.
    c.loss = ml_collections.ConfigDict()
    c.loss.name = "arcface"
    c.loss.s = 64.0
    for field in losses.hyperparameter_names():
        c.loss[field] = config_dict.placeholder(float)

    # ---- BroadFace queue (per device: the paper's "8,192 per GPU")
    c.queue = ml_collections.ConfigDict()
    c.queue.size_per_device = 8192  # 0 disables BroadFace (plain ArcFace)
    c.queue.compensate = True
    # queue rows per device per chunk of the classifier loss (0 = unchunked); peak
    # memory follows it. With W split over n class shards it is divided by n.
    c.queue.chunk_size = 2048
    # inputs of the queue's two products per chunk (logits, W gradient): float32 | bfloat16
    # (cast to bfloat16, accumulated in float32; error: docs/BENCHMARKS.md "Queue matmul dtype")
    c.queue.matmul_dtype = "float32"
    # > 0: before the first update, that many forward passes (train mode, no update of
    # parameters, BN statistics or step) enqueue the batches that precede step 1, so the
    # first update already sees them (size_per_device / per_device_batch_size fills the
    # queue). Training then reads the data stream from batch prefill_steps on.
    c.queue.prefill_steps = 0

    # ---- data
    c.num_classes = 85742  # MS1MV2; 0 = from the prepared data set's metadata (checked against it)
    c.per_device_batch_size = 128
    c.image_size = 112
    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = "tfds"  # tfds | synthetic
    c.dataset.tfds_name = "insightface_rec"  # a builder from broadface_jax.datasets
    c.dataset.data_dir = ""  # TFDS data_dir ("" = TFDS default)
    c.dataset.split = "train"
    c.dataset.random_flip = True
    # face: resize to image_size (if needed) + flip | retrieval: resize to resize_to^2, random
    # resized crop to image_size + flip (broadface_jax/input_pipeline.py; configs/retrieval.py)
    c.dataset.augment = "face"
    c.dataset.normalize = "face"  # face: (x/255 - 0.5)/0.5 | imagenet: (x/255 - mean)/std (torchvision)
    c.dataset.resize_to = 256  # retrieval only: training crops and the evaluation centre crop come from it
    c.dataset.crop_scale = (0.16, 1.0)  # retrieval only: area fraction of the random resized crop
    c.dataset.crop_ratio = (0.75, 1.33)  # retrieval only: aspect ratio (w/h) range of that crop
    c.dataset.synthetic = ml_collections.ConfigDict()  # used when name == 'synthetic'
    c.dataset.synthetic.num_identities = 0
    c.dataset.synthetic.heldout_identities = 0
    c.dataset.synthetic.samples_per_identity = 0

    # ---- optimisation (separate settings for encoder and classifier; train_step.build_optimizer)
    # lr at step s: lr * lr_decay ** #{b in lr_boundaries: b <= s}, times each part's
    # lr_scale; warmup_steps w > 0 ramps lr * (s + 1) / w over the first w steps.
    # sgd is PyTorch's: g += weight_decay * p; buf = momentum * buf + g; p -= lr * buf.
    c.total_steps = 80_000
    c.lr = 5e-3
    c.lr_boundaries = (50_000, 70_000)
    c.lr_decay = 0.1
    c.warmup_steps = 0
    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.encoder = ml_collections.ConfigDict(
        dict(name="sgd", momentum=0.9, weight_decay=5e-4, lr_scale=1.0))
    c.optimizer.classifier = ml_collections.ConfigDict(
        dict(name="sgd", momentum=0.9, weight_decay=5e-4, lr_scale=1.0))
    # 0 = off; > 0 clips each part (encoder, classifier) separately to this L2 norm over
    # that part's gradient, before weight decay (insightface: 5 on the backbone only)
    c.grad_clip_norm = 0.0

    # ---- sharding: mesh axes and regex -> PartitionSpec rules
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices not used by other axes
    c.mesh.model = 1  # > 1 shards the classifier over classes
    c.classifier_sharding = "replicated"  # replicated | model | all

    # ---- class sampling (PartialFC-style; broadface_jax/class_sampling.py)
    c.classifier = ml_collections.ConfigDict()
    # 1.0 = every class each step. r < 1: per classifier shard, the classes of the global
    # batch and of the valid queue rows plus uniform negatives, ceil(r * rows per shard)
    # rows in all; the batch and the queue are scored against those rows only.
    c.classifier.sample_rate = 1.0

    # ---- warm start (the paper starts BroadFace from an ArcFace-trained model)
    c.init_from = ""  # workdir or checkpoint dir of another run ("" = from scratch)
    c.init_classifier = True  # also load the classifier rows from init_from

    # ---- resuming a run in the same workdir
    # 0 = the latest checkpoint; N = roll back to kept checkpoint N: every command that asks
    # rolls back (the newer checkpoints are set aside), except the same invocation requeued
    # ($BROADFACE_RUN_ID or $SLURM_JOB_ID unchanged), which resumes its own progress
    c.restore_step = 0
    # When checkpoints exist and none can be read (corrupt, incomplete, failing checksums) a
    # run stops and moves nothing; True sets them aside and starts over (init_from or seed).
    c.start_over = False
    # Fields that may differ from the workdir's config.json on resume although they change
    # what the saved state means (workdir.SEMANTIC_FIELDS: seed, model, data, loss, batch,
    # queue, optimizer type; comma-separated dotted names or prefixes, "*" = any). Changes
    # of the state's layout (shapes) are refused whatever this says, except the queue's size
    # (re-laid out); optimizer hyperparameters and schedules need no permission.
    c.allow_resume_changes = ""

    # ---- loop, logging, checkpoints, evaluation
    c.log_every_steps = 100
    # > 0: trace that many steps for TensorBoard's profile tab (workdir/tensorboard), from
    # the 6th step after the run (re)starts on, so compilation stays out of the trace
    c.profile_steps = 0
    c.checkpoint_every_steps = 2000
    c.keep_checkpoints = 3
    c.eval_every_steps = 10_000
    c.eval = ml_collections.ConfigDict()
    # What is evaluated, in order: names of c.evals entries, type names (lfw_dev, cfp_fp,
    # cfp_ff, lfw_people_test, synthetic, sop, inshop, cub200, cars196) or '<type>:<path>'
    # (bin:agedb_30, ijbb:/data/IJB_release/IJBB, ijbc:..., megaface:<root>, ytf:<root>).
    c.eval.targets = ("lfw_dev", "cfp_fp")
    c.eval.batch_size = 256
    c.eval.data_root = "../shared/data"
    c.eval.bin_dir = ""  # folder with insightface .bin files (lfw.bin, agedb_30.bin, ...)
    # decoded/aligned target images (.npz); "" = $BROADFACE_EVAL_CACHE or ~/.cache/broadface_jax/eval
    c.eval.cache_dir = ""
    # Recall@K targets (sop, inshop, cub200, cars196): TFDS data_dir of their test splits
    # ("" = config.dataset.data_dir)
    c.eval.tfds_data_dir = ""
    # Named targets with options, as big_vision's config.evals (`python -m broadface_jax.evaluate
    # --targets list` lists each type's options), run when named in c.eval.targets, e.g.
    #   c.evals.ijbc = dict(type="ijbc", root="/data/IJB_release/IJBC", use_face_scores=True)
    #   c.evals.megaface = dict(type="megaface", root="/data/megaface", ranks=(1, 10))
    c.evals = ml_collections.ConfigDict()

    return c
