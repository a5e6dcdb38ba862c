r"""Neural style transfer (Gatys et al.; keras.io's recipe): an image with the content of one
photo and the style of another, by gradient descent on the image through a VGG (or one of our
networks). Resumable: run the same command again after a stop.

  python -m research.apps.style_transfer --content=cat.jpg --style=painting.jpg \
      --weights=~/.keras/models/vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5 \
      --out_dir=style/cat
  python -m research.apps.style_transfer --content=cat.jpg --style=painting.jpg \
      --model=fast --weights=lab_scratch --checkpoint_dir=checkpoints --out_dir=style/cat_fast
  tensorboard --logdir style/cat/tensorboard

Writes <out_dir>/result.png (every --checkpoint_every steps and at the end), losses.json,
style_transfer.json (the settings a resume must match), checkpoints/ and tensorboard/.
Settings: research.explain.style_transfer.StyleOptions (docs/course.md).
"""

from __future__ import annotations

import os

from absl import flags

from research import runs
from research.apps import config_flags
from research.errors import UserError
from research.explain.style_transfer import StyleOptions

FLAGS = flags.FLAGS
flags.DEFINE_string("content", None, "The content image (JPEG/PNG).")
flags.DEFINE_string("style", None, "The style image (JPEG/PNG).")
flags.DEFINE_string("out_dir", None, "Output folder (the same one resumes).")
flags.DEFINE_string("checkpoint_dir", runs.CHECKPOINT_DIR, "Parent folder of our runs "
                    "(--weights=<run name>).")
config_flags.define_flags(StyleOptions)
flags.mark_flags_as_required(["content", "style", "out_dir"])


def main(argv):
    del argv
    try:
        opts = StyleOptions(**config_flags.values_from_flags(StyleOptions))
        problem = opts.validate()
        if problem:
            raise UserError(f"--{problem[0]}: {problem[1]}")
        for flag in ("content", "style"):
            if not os.path.isfile(FLAGS[flag].value):
                raise UserError(f"--{flag}: {FLAGS[flag].value} not found")
        from research.explain.style_transfer import style_transfer  # TensorFlow from here

        res = style_transfer(FLAGS.content, FLAGS.style, opts, FLAGS.out_dir,
                             checkpoint_dir=FLAGS.checkpoint_dir)
    except UserError as e:
        config_flags.fail(e)
    print(f"steps {res.start_step} -> {res.final_step} in {res.seconds:.1f} s: "
          f"{os.path.join(FLAGS.out_dir, 'result.png')}")


if __name__ == "__main__":
    config_flags.run(main)
