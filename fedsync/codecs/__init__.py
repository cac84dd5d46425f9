"""Wire codecs for model deltas.

A delta travels as a list of :class:`TensorSpec` plus one ``bytes`` payload.
The payload is the concatenation of one *section* per spec, in spec order,
little-endian, with no header and no padding; each codec defines its section:

``float32``       ``n`` x ``<f4``
``float16``       ``n`` x ``<f2``
``int8``          one ``<f4`` scale, then ``n`` x ``i1``; value = q * scale
``int8-channel``  ``C`` x ``<f4`` scales (``C`` = last axis, 1 for scalars),
                  then ``n`` x ``i1`` in C order; value = q * scale[last index]
``topk:<frac>``   ``<u4`` count ``k``, ``k`` x ``<u4`` strictly increasing flat
                  indices, ``k`` x ``<f4`` values; every other value is 0

``n`` is the element count of the spec's shape and ``TensorSpec.dtype`` is the
dtype of the decoded tensor (always ``"float32"``). A payload is validated in
full (length, counts, indices, scales) before anything is decoded or
accumulated, so a bad payload raises :class:`CodecError` and never leaves an
accumulator half-updated.
"""

from fedsync.codecs._base import Codec, CodecError, TensorSpec, add_scaled
from fedsync.codecs._delta import EncodedDelta, ErrorFeedback
from fedsync.codecs._registry import codec_names, get_codec

__all__ = [
    "Codec",
    "CodecError",
    "EncodedDelta",
    "ErrorFeedback",
    "TensorSpec",
    "add_scaled",
    "codec_names",
    "get_codec",
]
