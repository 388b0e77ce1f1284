"""Text-to-video on the embedded moving digits: the quickstart's DiT conditioned on captions.

    python -m vidit.train --config configs/text_digits.py --workdir runs/text_minilm
    python -m vidit.train --config configs/text_digits.py:encoder=byte --workdir runs/text_byte
    python -m vidit.sample --workdir runs/text_minilm --prompt "number seven going left" --out 7.gif
    python -m vidit.evaluate --workdir runs/text_minilm --num 500

The clips carry captions in several phrasings ("a seven drifting to the left", "the digit 7
moves left", ...: data_pipelines/moving_digits.py, captions='varied'). `encoder=minilm` (the
default) reads them through the frozen pretrained all-MiniLM-L6-v2, run in the train step;
`encoder=byte` through the small byte-level encoder trained with the DiT. vidit.evaluate scores
samples for captions of the training phrasings and for paraphrases no training caption has
("number seven going left"). Results: docs/text/README.md.

Variants: encoder=<minilm|byte>, smoke, shapes=mixed (clips at native sizes in buckets:
moving_digits.py's mixed set of images and 4/8/16-frame clips at 32x32, 32x48 and 48x32).
"""
from configs import quickstart
from vidit import config_lib


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, encoder="minilm", smoke=False, shapes="square")
    c = quickstart.get_config()
    c.model.cond = "text"
    c.model.text_encoder.kind = arg.encoder
    if arg.encoder == "minilm":
        c.model.text_width = 384  # the encoder's width
        c.model.text_encoder.online = True  # 22M frozen parameters: cheap next to caching
        c.model.text_len = c.data.text_len = 16  # WordPiece tokens: the longest caption has 12 with [CLS]/[SEP]
    elif arg.encoder == "byte":
        c.model.text_len = c.data.text_len = 56  # bytes: the longest caption has 51 with BOS
    else:
        raise ValueError(f"encoder={arg.encoder!r}: valid are minilm, byte")
    if arg.smoke:
        config_lib.make_smoke(c)  # a tiny dataset: its own builder_kwargs
    c.data.builder_kwargs = {**c.data.builder_kwargs, "captions": "varied"}
    if arg.shapes == "mixed":  # moving_digits.py:shapes=mixed's buckets at 4 and 1 frames
        c.data.builder_kwargs["shapes"] = "mixed"
        c.data.buckets = "4x32x32, 4x32x48, 4x48x32, 1x32x32, 1x32x48, 1x48x32"
        c.model.patch = (1, 4, 4)  # a 1-frame image has no pair of frames to patch together
    return c
