"""Video in and out through PyAV (the Python bindings of FFmpeg's libraries).

Frames are decoded as RGB uint8 arrays and written as H.264 MP4 at the input's frame rate. PyAV is
imported only here, so the rest of the project runs without it. Any file PyAV cannot open or
decode raises ``DatasetError`` naming it; a video being written lives in a temporary file next to
its destination until ``close`` renames it there, so an interrupted run leaves no half video.
"""
import os
import tempfile
from pathlib import Path

from dataset.common import DatasetError

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm")
VIDEO_CODEC = "libx264"
# Constant-quality H.264; 18 is about visually lossless, so thin classes (poles, signs) stay visible.
VIDEO_CRF = "18"


def _import_av():
    try:
        import av
    except ImportError:
        raise DatasetError("reading and writing videos needs PyAV: pip install av") from None
    return av


class VideoReader:
    """The first video stream of a file: ``rate`` (frames/s, a Fraction), ``width``, ``height``,
    ``frame_count`` (from the container; None when it does not say) and ``frames()``."""

    def __init__(self, path):
        av = _import_av()
        self.path = Path(path)
        self._errors = (av.FFmpegError, OSError)
        try:
            self.container = av.open(str(path))
        except self._errors as error:
            raise DatasetError(f"cannot read video {path}: {error}") from None
        try:
            if not self.container.streams.video:
                raise DatasetError(f"{path} holds no video stream")
            self.stream = self.container.streams.video[0]
            if self.stream.codec_context is None:
                raise DatasetError(f"{path}: FFmpeg has no decoder for its video codec")
            self.stream.thread_type = "AUTO"  # let FFmpeg decode on several threads
            self.rate = self.stream.average_rate or self.stream.guessed_rate
            if not self.rate:
                raise DatasetError(f"{path}: its video stream records no frame rate")
            self.width, self.height = self.stream.codec_context.width, self.stream.codec_context.height
            self.frame_count = self.stream.frames or None
        except BaseException:
            self.container.close()
            raise

    def frames(self):
        """RGB uint8 (height, width, 3) arrays, in display order."""
        try:
            for frame in self.container.decode(self.stream):
                yield frame.to_ndarray(format="rgb24")
        except self._errors as error:
            raise DatasetError(f"cannot decode video {self.path}: {error}") from None

    def close(self):
        self.container.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


class VideoWriter:
    """An H.264 MP4 at ``rate`` frames/s written frame by frame; ``close`` publishes it at ``path``.

    yuv420p (what every player reads) needs even sizes; odd ones are encoded yuv444p so the
    size is kept exactly.
    """

    def __init__(self, path, rate, width, height):
        self.av = _import_av()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, self.temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".mp4", dir=self.path.parent)
        os.close(handle)
        try:
            self.container = self.av.open(self.temporary, "w", format="mp4")
            self.stream = self.container.add_stream(VIDEO_CODEC, rate=rate)
            self.stream.width, self.stream.height = width, height
            self.stream.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
            self.stream.options = {"crf": VIDEO_CRF}
        except BaseException:
            os.unlink(self.temporary)
            raise

    def write(self, rgb):
        frame = self.av.VideoFrame.from_ndarray(rgb, format="rgb24")
        self.container.mux(self.stream.encode(frame))

    def close(self):
        """Flush the encoder, close the file and rename it into place."""
        try:
            self.container.mux(self.stream.encode(None))
            self.container.close()
            os.replace(self.temporary, self.path)
        except BaseException:
            self.abort()
            raise

    def abort(self):
        """Drop the partial video; whatever was at ``path`` before stays."""
        try:
            self.container.close()
        except (self.av.FFmpegError, OSError, ValueError):
            pass
        if os.path.exists(self.temporary):
            os.unlink(self.temporary)
