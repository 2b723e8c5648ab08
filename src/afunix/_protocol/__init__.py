"""Sans-IO framing of messages that carry descriptors (the afunix channel protocol).

No I/O here: bytes and descriptor numbers go in, messages come out (h11's
style); :mod:`afunix.channel` and :mod:`afunix.aio` do the ``sendmsg`` and
``recvmsg`` around it. :mod:`.framing` holds the wire format (the header and
its one check, packets, events, errors); :mod:`.decoder` the stream decoder
(one decoding loop, one place for the rules of batched descriptors).
"""

from .._cmsg import SCM_MAX_FD as SCM_MAX_FD
from .decoder import BATCH_SPAN as BATCH_SPAN
from .decoder import StreamDecoder as StreamDecoder
from .framing import CLOSED as CLOSED
from .framing import DEFAULT_MAX_SIZE as DEFAULT_MAX_SIZE
from .framing import FLAG_MEMFD as FLAG_MEMFD
from .framing import HEADER as HEADER
from .framing import KNOWN_FLAGS as KNOWN_FLAGS
from .framing import MAGIC as MAGIC
from .framing import NEED_DATA as NEED_DATA
from .framing import Event as Event
from .framing import FrameError as FrameError
from .framing import RawMessage as RawMessage
from .framing import decode_header as decode_header
from .framing import decode_packet as decode_packet
from .framing import encode_header as encode_header

__all__ = ["BATCH_SPAN", "CLOSED", "DEFAULT_MAX_SIZE", "FLAG_MEMFD", "HEADER", "KNOWN_FLAGS"]
__all__ += ["MAGIC", "NEED_DATA", "SCM_MAX_FD", "Event", "FrameError", "RawMessage"]
__all__ += ["StreamDecoder", "decode_header", "decode_packet", "encode_header"]
