"""FDA: Fourier domain adaptation (Yang and Soatto, CVPR 2020).

Each source image is restyled with a random target image of the batch: the amplitudes of its 2-D
Fourier spectrum inside a low-frequency window are replaced by the target's, its phase is kept
everywhere, and the inverse transform gives an image with the source's content and the target's
global colour and illumination. It is done in pixel space (RGB, 0..255), before the input
normalisation, as in the paper, and the result is clamped back to that range (an image again).

The window is centred on the zero frequency: every frequency ``(f_y, f_x)`` with ``|f_y| <= b`` and
``|f_x| <= b``, ``b = floor(min(H, W) * beta)``, i.e. ``2b + 1`` frequencies per axis, symmetric in
``+f``/``-f``. This is the window of the official numpy version (``low_freq_mutate_np``: fftshift,
then ``[c - b, c + b + 1)``). The official PyTorch version (``low_freq_mutate``), which its training
script uses, swaps the four corner blocks ``[0, b)`` and ``[H - b, H)``: frequencies ``0..b-1`` and
``-b..-1`` (the window bug reported as FDA issue #40). That window is off by one and asymmetric:
``-b`` is swapped but ``+b`` is not, so the new spectrum is no longer Hermitian and the image it
stands for is not real (``irfft`` silently drops the imaginary part). Here the window holds
``+f`` exactly when it holds ``-f``, so the restyled image is real up to rounding.

Source and target images of different sizes: the target image is resized (bilinear) to the
source size first; only its lowest frequencies are used, which resizing barely changes.
"""
import torch
import torch.nn.functional as F

PIXEL_MAX = 255.0


def low_frequency_window(height, width, beta, device=None):
    """Bool [H, W] mask, in ``torch.fft.fft2``'s (unshifted) layout, of the frequencies with
    ``|f_y| <= b`` and ``|f_x| <= b``, ``b = floor(min(H, W) * beta)``."""
    half_width = int(min(height, width) * beta)  # floor, beta >= 0
    f_y = (torch.fft.fftfreq(height, device=device) * height).round().abs()  # integer frequencies
    f_x = (torch.fft.fftfreq(width, device=device) * width).round().abs()
    return (f_y[:, None] <= half_width) & (f_x[None, :] <= half_width)


def swap_low_frequency_amplitude(source, target, beta):
    """Float [..., H, W] source images with the amplitude spectrum of ``target`` (same shape) inside
    the low-frequency window; the source's phase everywhere. Returns float32 of the source's shape."""
    source_spectrum = torch.fft.fft2(source.float())
    target_amplitude = torch.fft.fft2(target.float()).abs()
    window = low_frequency_window(source.shape[-2], source.shape[-1], beta, source.device)
    amplitude = torch.where(window, target_amplitude, source_spectrum.abs())
    return torch.fft.ifft2(torch.polar(amplitude, source_spectrum.angle())).real


class FourierStyleTransfer:
    """Restyle a normalised source batch with random images of the normalised target batch."""

    def __init__(self, beta, source_normalization, target_normalization):
        self.beta = beta
        self.source_normalization = source_normalization
        self.target_normalization = target_normalization

    def __call__(self, source_images, target_images, generator):
        """[B, 3, Hs, Ws] and [Bt, 3, Ht, Wt] normalised batches -> restyled normalised source batch.
        Target image ``i`` of the batch is drawn for each source image from ``generator``."""
        picked = torch.randint(target_images.shape[0], (source_images.shape[0],), generator=generator,
                               device=generator.device).to(target_images.device)
        target = self.target_normalization.to_pixels(target_images[picked].float())
        if target.shape[-2:] != source_images.shape[-2:]:
            target = F.interpolate(target, size=source_images.shape[-2:], mode="bilinear", align_corners=False)
        source = self.source_normalization.to_pixels(source_images.float())
        restyled = swap_low_frequency_amplitude(source, target, self.beta).clamp(0.0, PIXEL_MAX)
        return self.source_normalization.normalize_tensor(restyled).to(source_images.dtype)
