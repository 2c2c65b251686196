"""The input pipeline: where images come from, how they are decoded, kept, varied and batched.

One module per stage, in the order an example meets them:

- `sources`: what a dataset is (`DataSource`: classes, train/val split sizes,
  example makers, names of examples) and where it comes from (an image folder,
  TFDS, synthetic stripes); `create_data_source`.
- `folders`: image folders on disk: which files are usable images (from their
  headers alone), their classes, each JPEG's size.
- `few_shot`: the training examples --examples_per_class keeps (K per class, by
  seed), drawn by `sources` from the training split.
- `decode`: encoded bytes -> uint8 images at the size they are stored at
  (JPEGs decoded to size, at the DCT scale of the header the folder listing
  read); undecodable files left out and named (`DecodeSkips`).
- `cache`: where decoded images are kept (`plan_cache`: memory, files published
  by rename, none) and the cache stage (`cache_examples`).
- `augment`: the random parts after the cache: crops and flips per image,
  MixUp per batch.
- `pipeline`: one input pipeline put together (`create_dataset`): shard ->
  decode -> cache -> shuffle -> augment -> batch -> [MixUp] -> prefetch; the
  cache chosen for a source (`choose_cache`), a preview, steps per epoch.

Callers import the modules they need: `from trainer.data import pipeline, sources`.
"""
