"""Image decoding: every format comes out as one 8-bit grey channel with its contrast kept."""
import numpy as np
import pytest
from PIL import Image

from datasets import ImageDecodeError, load_image, to_rgb
from datasets.synthetic import write_dicom

RAMP = np.tile(np.linspace(0, 1, 32), (24, 1))  # 24 x 32, dark left, bright right


def test_8bit_grey_png_is_unchanged(tmp_path):
    pixels = (RAMP * 200 + 20).astype(np.uint8)
    Image.fromarray(pixels, mode="L").save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert img.mode == "L" and img.size == (32, 24)
    assert np.array_equal(np.asarray(img), pixels)


def test_16bit_png_keeps_contrast(tmp_path):
    # 12-bit data in a 16-bit PNG: convert('L') would clamp all of it to 255.
    pixels = (RAMP * 3000 + 1000).astype(np.uint16)
    Image.fromarray(pixels).save(tmp_path / "a16.png")
    assert Image.open(tmp_path / "a16.png").mode.startswith("I")
    out = np.asarray(load_image(tmp_path / "a16.png")).astype(int)
    assert out.min() == 0 and out.max() == 255
    assert out[:, 0].mean() < 10 and out[:, -1].mean() > 245  # the ramp survives
    assert np.all(np.diff(out[0]) >= 0)


def test_rgb_rgba_palette_la_and_jpeg_decode(tmp_path):
    grey = (RAMP * 255).astype(np.uint8)
    rgb = np.stack([grey] * 3, -1)
    Image.fromarray(rgb, "RGB").save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([rgb, np.full_like(grey, 255)]), "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(grey, "L").convert("P").save(tmp_path / "pal.png")
    Image.fromarray(grey, "L").convert("LA").save(tmp_path / "la.png")
    Image.fromarray(rgb, "RGB").save(tmp_path / "rgb.jpg", quality=95)
    Image.fromarray(grey, "L").save(tmp_path / "grey.jpg", quality=95)
    for name in ("rgb.png", "rgba.png", "pal.png", "la.png", "rgb.jpg", "grey.jpg"):
        img = load_image(tmp_path / name)
        assert img.mode == "L" and img.size == (32, 24), name
        err = np.abs(np.asarray(img).astype(int) - grey.astype(int)).mean()
        assert err < 4, (name, err)


def test_to_rgb_gives_identical_channels(tmp_path):
    img = Image.fromarray((RAMP * 255).astype(np.uint8), "L")
    rgb = np.asarray(to_rgb(img))
    assert rgb.shape == (24, 32, 3)
    assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])


def test_dicom_monochrome1_is_inverted(tmp_path):
    pixels = (RAMP * 4000).astype(np.uint16)
    m2 = np.asarray(load_image(write_dicom(tmp_path / "m2.dcm", pixels, "MONOCHROME2"))).astype(int)
    m1 = np.asarray(load_image(write_dicom(tmp_path / "m1.dcm", pixels, "MONOCHROME1"))).astype(int)
    assert m2[:, 0].mean() < 5 and m2[:, -1].mean() > 250  # scaled to the full 0-255 range
    assert np.abs(m1 - (255 - m2)).max() <= 1


def test_dicom_voi_window_is_applied(tmp_path):
    pixels = (RAMP * 4000).astype(np.uint16)  # 0 .. 4000
    path = write_dicom(tmp_path / "w.dcm", pixels, WindowCenter=1000, WindowWidth=1000)
    out = np.asarray(load_image(path)).astype(int)
    values = pixels.astype(float)
    assert (out[values <= 500] == 0).all()  # below the window: black
    assert (out[values >= 1500] == 255).all()  # above: white
    inside = (values > 600) & (values < 1400)
    expected = ((values[inside] - 999.5) / 999 + 0.5) * 255
    assert np.abs(out[inside] - expected).max() <= 1
    # Without the window the same pixels span the whole range (min-max).
    plain = np.asarray(load_image(write_dicom(tmp_path / "p.dcm", pixels))).astype(int)
    assert (plain == 255).sum() < (out == 255).sum()


def test_dicom_rescale_8bit_and_no_suffix(tmp_path):
    pixels = (RAMP * 255).astype(np.uint8)
    path = write_dicom(tmp_path / "r.dcm", pixels, bits_stored=8, RescaleSlope=-1, RescaleIntercept=255)
    out = np.asarray(load_image(path)).astype(int)
    assert np.abs(out - (255 - pixels.astype(int))).max() <= 1  # slope -1 flips the values
    renamed = tmp_path / "image_without_suffix"
    renamed.write_bytes(path.read_bytes())
    assert np.array_equal(np.asarray(load_image(renamed)), out)


def test_dicom_sigmoid_window_and_voi_lut(tmp_path):
    pixels = (RAMP * 4000).astype(np.uint16)
    out = np.asarray(load_image(write_dicom(tmp_path / "s.dcm", pixels, WindowCenter=2000, WindowWidth=800,
                                            VOILUTFunction="SIGMOID")))
    assert out[:, 0].max() < 10 and out[:, -1].min() > 245 and 100 < out[:, 16].mean() < 160

    from pydicom.dataset import Dataset
    lut = Dataset()
    lut.add_new(0x00283002, "US", [256, 0, 8])  # LUT Descriptor: 256 entries from 0, 8 bits
    lut.add_new(0x00283006, "US", list(range(255, -1, -1)))  # LUT Data: inverting
    path = write_dicom(tmp_path / "lut.dcm", (RAMP * 255).astype(np.uint16), VOILUTSequence=[lut])
    inv = np.asarray(load_image(path)).astype(int)
    assert inv[:, 0].mean() > 245 and inv[:, -1].mean() < 10


def test_truncated_and_garbage_files_raise(tmp_path):
    Image.fromarray((np.random.default_rng(0).random((256, 256)) * 255).astype(np.uint8)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.png").write_bytes(b"this is not an image")
    for name in ("cut.png", "junk.png"):
        with pytest.raises(ImageDecodeError, match=name):
            load_image(tmp_path / name)
    pixels = (RAMP * 4000).astype(np.uint16)
    dcm = write_dicom(tmp_path / "cut.dcm", pixels).read_bytes()
    (tmp_path / "cut.dcm").write_bytes(dcm[:-200])
    with pytest.raises(ImageDecodeError, match="cut.dcm"):
        load_image(tmp_path / "cut.dcm")


def _reference_scale(array, invert):
    """The min-max formula in float64, written out."""
    a = array.astype(np.float64)
    lo, hi = a.min(), a.max()
    if invert:
        a = hi + lo - a
    return np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


@pytest.mark.parametrize("dtype,low,high", [
    (np.uint8, 0, 256), (np.uint8, 37, 200), (np.uint16, 0, 4096), (np.uint16, 1000, 65536),
    (np.int16, -32768, 32768), (np.int32, -5000, 70000), (np.float32, -3, 3),
])
@pytest.mark.parametrize("invert", [False, True])
def test_scale_to_uint8_lookup_equals_float_formula(dtype, low, high, invert):
    from datasets.imageio import scale_to_uint8

    rng = np.random.default_rng(0)
    if np.issubdtype(dtype, np.integer):
        array = rng.integers(low, high, size=(57, 43)).astype(dtype)
    else:
        array = rng.uniform(low, high, size=(57, 43)).astype(dtype)
    out = scale_to_uint8(array, invert=invert)
    assert out.dtype == np.uint8 and out.shape == array.shape
    np.testing.assert_array_equal(out, _reference_scale(array, invert))
    assert out.min() == 0 and out.max() == 255


def test_scale_to_uint8_constant_and_bool():
    from datasets.imageio import scale_to_uint8

    assert not scale_to_uint8(np.full((4, 4), 700, np.uint16)).any()
    mask = np.eye(3, dtype=bool)
    np.testing.assert_array_equal(scale_to_uint8(mask), mask.astype(np.uint8) * 255)
    np.testing.assert_array_equal(scale_to_uint8(mask, invert=True), (~mask).astype(np.uint8) * 255)


def _compress(src, dest, syntax: str):
    """Re-encode an uncompressed DICOM file with a lossless transfer syntax."""
    import pydicom
    import pydicom.uid

    if syntax == "JPEGLosslessSV1":  # pydicom has no encoder for it: GDCM's
        import gdcm

        reader = gdcm.ImageReader()
        reader.SetFileName(str(src))
        assert reader.Read(), src
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
        change.SetInput(reader.GetImage())
        assert change.Change()
        writer = gdcm.ImageWriter()
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        writer.SetFileName(str(dest))
        assert writer.Write(), dest
    else:
        ds = pydicom.dcmread(src)
        ds.compress(getattr(pydicom.uid, syntax), ds.pixel_array)
        ds.save_as(dest)
    ts = pydicom.dcmread(dest).file_meta.TransferSyntaxUID
    assert ts == getattr(pydicom.uid, syntax) and ts.is_compressed
    return dest


@pytest.mark.parametrize("syntax", ["RLELossless", "JPEGLosslessSV1", "JPEG2000Lossless", "JPEGLSLossless"])
def test_compressed_dicom_decodes_like_uncompressed(tmp_path, syntax):
    """Lossless RLE, JPEG lossless, JPEG 2000 and JPEG-LS pixel data (decoders from the
    requirements) give exactly the uncompressed file's image."""
    pixels = (np.random.default_rng(3).random((40, 56)) * 4000).astype(np.uint16)
    plain = write_dicom(tmp_path / "plain.dcm", pixels, photometric="MONOCHROME1")
    packed = _compress(plain, tmp_path / "packed.dcm", syntax)
    expected = np.asarray(load_image(plain))
    assert expected.std() > 50  # a real image, not a constant
    np.testing.assert_array_equal(np.asarray(load_image(packed)), expected)


def test_undecodable_compressed_dicom_names_file_and_syntax(tmp_path):
    """A JPEG lossless file whose bitstream is broken fails with the file and its transfer
    syntax in the message, as an ImageDecodeError (skipped or reported like any bad image)."""
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLosslessSV1

    path = write_dicom(tmp_path / "lossless14.dcm", np.zeros((8, 8), np.uint16))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xc3" + bytes(20)])
    ds["PixelData"].VR = "OB"
    ds.save_as(path)
    with pytest.raises(ImageDecodeError) as err:
        load_image(path)
    message = str(err.value)
    assert "lossless14.dcm" in message and "transfer syntax: JPEG Lossless" in message


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("dtype,bits", [(np.uint16, 12), (np.uint8, 8)])
def test_dicom_paper_scaling(tmp_path, photometric, dtype, bits):
    """The paper's rule: x * 255 / max rounded, no minimum subtracted (min > 0 here), then
    MONOCHROME1 inverted as 255 - value; 'minmax' stretches the same values to 0-255."""
    from datasets.imageio import decode_dicom

    pixels = np.tile(np.array([20, 60, 120, 230], dtype), (3, 2))
    path = write_dicom(tmp_path / "p.dcm", pixels, photometric, bits_stored=bits)
    paper = decode_dicom(path, "paper")[0, :4].astype(int)
    minmax = decode_dicom(path, "minmax")[0, :4].astype(int)
    if photometric == "MONOCHROME2":
        assert paper.tolist() == [22, 67, 133, 255] and minmax.tolist() == [0, 49, 121, 255]
    else:
        assert paper.tolist() == [233, 188, 122, 0] and minmax.tolist() == [255, 206, 134, 0]
    assert np.array_equal(np.asarray(load_image(path, dicom_scaling="paper"))[0, :4], paper)


def test_dicom_paper_scaling_ignores_rescale_and_window(tmp_path):
    """The paper's loader reads the stored values: no rescale slope / intercept, no VOI window."""
    from datasets.imageio import decode_dicom, scale_paper

    pixels = (RAMP * 3000 + 500).astype(np.uint16)
    plain = decode_dicom(write_dicom(tmp_path / "a.dcm", pixels), "paper")
    other = decode_dicom(write_dicom(tmp_path / "b.dcm", pixels, WindowCenter=1000, WindowWidth=400,
                                     RescaleSlope=2, RescaleIntercept=-100), "paper")
    assert np.array_equal(plain, other)
    # The lookup table equals the elementwise float32 formula (OpenCV's convertScaleAbs).
    alpha = np.float32(255.0 / pixels.max())
    np.testing.assert_array_equal(plain, np.rint(pixels.astype(np.float32) * alpha).astype(np.uint8))
    np.testing.assert_array_equal(scale_paper(pixels.astype(np.float64)), plain)
    assert not scale_paper(np.zeros((2, 2), np.uint16)).any()
    with pytest.raises(ValueError, match="--dicom_scaling raw: expected one of paper, minmax"):
        decode_dicom(tmp_path / "a.dcm", "raw")


def test_rsna_data_sets_default_to_the_paper_scaling(tmp_path):
    from datasets import build_dataset

    for folder, expected in (("RSNA_Pneumonia", "paper"), ("custom_set", "minmax")):
        root = tmp_path / folder
        (root / "img").mkdir(parents=True)
        write_dicom(root / "img/a.dcm", np.tile(np.array([20, 60, 120, 230], np.uint16), (4, 1)))
        (root / "test_list.txt").write_text("img/a.dcm 1\n")
        ds = build_dataset("test", root, cache="off")
        assert ds.dicom_scaling == expected and ds.cache_info["dicom_scaling"] == expected
        first = np.asarray(ds.load_image(0))[0].tolist()
        assert first == ([22, 67, 133, 255] if expected == "paper" else [0, 49, 121, 255])
        assert build_dataset("test", root, cache="off", dicom_scaling="minmax").load_image(0).getpixel((0, 0)) == 0


@pytest.mark.parametrize("scaling", ["minmax", "paper"])
@pytest.mark.parametrize("name,value", [("RescaleSlope", "nan"), ("RescaleIntercept", "inf"),
                                        ("RescaleSlope", "-inf")])
def test_non_finite_rescale_is_refused_naming_the_file(tmp_path, scaling, name, value):
    """A slope of "nan" would decode as a blank image (every value nan, then 0): refused, by the
    decoder and by the cheap header check, in one line naming the file and the element."""
    import warnings

    from datasets import build_dataset, check_image_header

    pixels = (RAMP * 3000 + 500).astype(np.uint16)
    root = tmp_path / "mydata"
    (root / "img").mkdir(parents=True)
    with warnings.catch_warnings():  # pydicom warns that 'nan' is no valid DS value while writing it
        warnings.simplefilter("ignore")
        bad = write_dicom(root / "img/bad.dcm", pixels, **{name: value})
        with pytest.raises(ImageDecodeError) as err:
            load_image(bad, dicom_scaling=scaling)
        message = str(err.value)
        assert message == (f"{bad}: DICOM {name} is '{value}', not a finite number (the image would decode "
                           f"blank); fix the file's header or leave it out")
        with pytest.raises(ImageDecodeError, match=rf"{name} is '{value}', not a finite number"):
            check_image_header(bad)
        write_dicom(root / "img/good.dcm", pixels, RescaleSlope=2, RescaleIntercept=-100)
        (root / "val_list.txt").write_text("img/good.dcm 0\nimg/bad.dcm 1\n")
        with pytest.raises(Exception, match=r"val_list\.txt:2: image 'img/bad\.dcm'.*not a finite number"):
            build_dataset("val", root, verify_images="header", dicom_scaling=scaling)
    assert np.asarray(load_image(root / "img/good.dcm")).max() == 255  # finite values: decoded


@pytest.mark.parametrize("fmt,magic_name", [("PNG", "PNG"), ("JPEG", "JPEG"), ("TIFF", "TIFF")])
def test_other_image_named_dcm_says_what_it_is(tmp_path, fmt, magic_name):
    """A PNG (or JPEG, TIFF) renamed to .dcm: the message says what the file really is, from its
    leading bytes, not that a DICOM has no pixel data."""
    from datasets import check_image_header

    path = tmp_path / "scan.dcm"
    Image.fromarray((RAMP * 255).astype(np.uint8), "L").save(path, format=fmt)
    expected = f"{path} is a {magic_name} image, not a DICOM file (its name ends in .dcm)"
    for read in (load_image, check_image_header):
        with pytest.raises(ImageDecodeError) as err:
            read(path)
        assert str(err.value).startswith(expected) and "no pixel data" not in str(err.value)
    # A real DICOM, and a headerless file that is neither, keep their own messages.
    assert load_image(write_dicom(tmp_path / "real.dcm", (RAMP * 255).astype(np.uint8))).size == (32, 24)
    (tmp_path / "junk.dcm").write_bytes(b"\x00" * 300)
    with pytest.raises(ImageDecodeError, match="no pixel data"):
        load_image(tmp_path / "junk.dcm")
