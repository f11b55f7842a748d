"""Accept negotiation for WADO-RS (PS3.18 8.7): parsing, q-values, wildcards, 406."""

from __future__ import annotations

import pytest

from imaging_gateway.dicom.mediatypes import (
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    MediaRange,
    Representation,
    frame_offers,
    parse_accept,
    select,
    select_bulkdata,
    select_frames,
    select_instances,
    select_metadata,
    select_rendered,
    select_thumbnail,
)
from imaging_gateway.errors import NotAcceptable

IMPLICIT = "1.2.840.10008.1.2"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.70"
J2K = "1.2.840.10008.1.2.4.91"
RLE = "1.2.840.10008.1.2.5"
MPEG4 = "1.2.840.10008.1.2.4.102"
DICOM = 'multipart/related; type="application/dicom"'

# ---------------------------------------------------------------------------
# Parsing


def test_parse_several_ranges_with_parameters_and_q() -> None:
    header = (
        'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50;'
        " q=0.9, multipart/related;type=application/dicom;transfer-syntax=*;q=0.5, */*;q=0.1"
    )
    assert parse_accept(header) == [
        MediaRange("multipart/related", "application/dicom", JPEG_BASELINE, 0.9),
        MediaRange("multipart/related", "application/dicom", "*", 0.5),
        MediaRange("*/*", None, None, 0.1),
    ]


def test_parse_is_case_insensitive_and_tolerant() -> None:
    got = parse_accept('Multipart/Related; TYPE="Application/DICOM"; Transfer-Syntax=1.2.3')
    assert got == [MediaRange("multipart/related", "application/dicom", "1.2.3", 1.0)]
    # A bare "*" (some HTTP stacks) is */*; malformed ranges and bad q values are skipped.
    assert parse_accept("*, text, application/json;q=abc, image/png;q=2, image/jpeg") == [
        MediaRange("*/*"),
        MediaRange("image/jpeg"),
    ]
    assert parse_accept(None) == [] == parse_accept("  ")


def test_parse_transfer_syntax_inside_quoted_type() -> None:
    # dcm4che issue 308: the part's parameters written inside the quoted type.
    got = parse_accept(
        'multipart/related;type="application/dicom;transfer-syntax=1.2.840.10008.1.2.4.70"'
    )
    assert got == [MediaRange("multipart/related", "application/dicom", JPEG_LOSSLESS)]


def test_parse_commas_inside_quotes_do_not_split() -> None:
    got = parse_accept('multipart/related; type="a/b,c"; q=0.3, image/png')
    assert [r.media_type for r in got] == ["multipart/related", "image/png"]
    assert got[0].part_type == "a/b,c" and got[0].q == 0.3


# ---------------------------------------------------------------------------
# Instances


def _makes_lossless(stored: str | None, target: str) -> str | None:
    """A fake server that decodes anything but MPEG-4 and encodes uncompressed and RLE."""
    if stored == MPEG4:
        return "no decoder"
    if target in (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT, RLE):
        return None
    return "no encoder"


@pytest.mark.parametrize(
    "accept",
    [
        None,
        "",
        f"{DICOM}; transfer-syntax=*",
        "application/dicom; transfer-syntax=*",
        f"{DICOM}; transfer-syntax=*, {DICOM}; transfer-syntax={RLE}",  # ties: as stored
    ],
)
def test_instances_as_stored_for_a_wildcard_or_no_accept(accept: str | None) -> None:
    choice = select_instances(
        accept, [JPEG_BASELINE, EXPLICIT_VR_LITTLE_ENDIAN], producible=_makes_lossless
    )
    assert choice.representation.content_type == DICOM
    assert choice.representation.transfer_syntax is None  # two syntaxes: parts name theirs
    assert choice.syntaxes == {
        JPEG_BASELINE: JPEG_BASELINE,
        EXPLICIT_VR_LITTLE_ENDIAN: EXPLICIT_VR_LITTLE_ENDIAN,
    }


@pytest.mark.parametrize(
    "accept",
    [
        DICOM,
        "multipart/related; type=application/dicom",  # unquoted type (OHIF style)
        "application/dicom",  # single part naming the parts' type (PS3.18 8.7.3)
        "multipart/related",
        "multipart/*",
        "*/*",
        'multipart/related; type="*/*"',
        "application/*",
        "text/html, */*;q=0.1",
        f"{DICOM}; transfer-syntax={EXPLICIT_VR_LITTLE_ENDIAN}",
    ],
)
def test_instances_without_a_syntax_get_explicit_vr_little_endian(accept: str) -> None:
    # PS3.18 8.7.3.5: no transfer-syntax parameter means Explicit VR Little Endian.
    choice = select_instances(
        accept, [JPEG_BASELINE, EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT], producible=_makes_lossless
    )
    assert set(choice.syntaxes.values()) == {EXPLICIT_VR_LITTLE_ENDIAN}
    assert choice.representation.transfer_syntax == EXPLICIT_VR_LITTLE_ENDIAN
    assert choice.representation.part_content_type == (
        f"application/dicom; transfer-syntax={EXPLICIT_VR_LITTLE_ENDIAN}"
    )


def test_instances_highest_q_that_can_be_made() -> None:
    accept = (
        f"{DICOM}; transfer-syntax={J2K}; q=1, {DICOM}; transfer-syntax={RLE}; q=0.8, "
        f"{DICOM}; q=0.5"
    )
    choice = select_instances(accept, [JPEG_BASELINE, J2K], producible=_makes_lossless)
    # J2K (q=1) cannot be made from JPEG (no encoder): RLE (q=0.8) can; J2K as stored.
    assert choice.syntaxes == {JPEG_BASELINE: RLE, J2K: J2K}
    accept = f"{DICOM}; transfer-syntax={RLE}; q=0.4, {DICOM}; q=0.6"
    choice = select_instances(accept, [JPEG_BASELINE], producible=_makes_lossless)
    assert choice.syntaxes == {JPEG_BASELINE: EXPLICIT_VR_LITTLE_ENDIAN}


def test_instances_not_acceptable_says_why() -> None:
    with pytest.raises(NotAcceptable) as caught:
        select_instances(
            f"{DICOM}; transfer-syntax={J2K}", [JPEG_BASELINE], producible=_makes_lossless
        )
    assert caught.value.status == 406
    assert caught.value.code == "not-acceptable"
    assert f"{JPEG_BASELINE} to {J2K}: no encoder" in caught.value.message
    with pytest.raises(NotAcceptable) as caught:
        select_instances(DICOM, [MPEG4], producible=_makes_lossless)
    assert "no decoder" in caught.value.message
    # Without a producer nothing is transcoded: only as stored.
    with pytest.raises(NotAcceptable) as caught:
        select_instances(DICOM, [JPEG_BASELINE])
    assert "nothing is transcoded" in caught.value.message
    assert select_instances(DICOM, [EXPLICIT_VR_LITTLE_ENDIAN]).syntaxes == {
        EXPLICIT_VR_LITTLE_ENDIAN: EXPLICIT_VR_LITTLE_ENDIAN
    }


@pytest.mark.parametrize(
    "accept",
    [
        "application/json",
        "application/dicom+json",
        'multipart/related; type="application/octet-stream"',
        "image/jpeg",
        "text/*",
        "garbage",
        f"{DICOM}; q=0",
        f"*/*, {DICOM}; q=0",  # the more specific range refuses it
        f"{DICOM}; transfer-syntax=*; q=0",
    ],
)
def test_instances_not_acceptable(accept: str) -> None:
    with pytest.raises(NotAcceptable):
        select_instances(accept, [JPEG_BASELINE], producible=_makes_lossless)


def test_instances_unknown_stored_syntax_needs_a_wildcard() -> None:
    for accept in (None, f"{DICOM}; transfer-syntax=*", DICOM):
        choice = select_instances(accept, [None], producible=_makes_lossless)
        assert choice.syntaxes == {None: None}
    with pytest.raises(NotAcceptable):
        select_instances(
            f"{DICOM}; transfer-syntax={EXPLICIT_VR_LITTLE_ENDIAN}", [None],
            producible=_makes_lossless,
        )


def test_frames_transcoded_offers() -> None:
    octet = 'multipart/related; type="application/octet-stream"'
    rep = select_frames(octet, JPEG_BASELINE, producible=_makes_lossless)
    assert rep.part_content_type == (
        f"application/octet-stream; transfer-syntax={EXPLICIT_VR_LITTLE_ENDIAN}"
    )
    rep = select_frames('multipart/related; type="image/dicom-rle"', IMPLICIT,
                        producible=_makes_lossless)
    assert rep.part_content_type == f"image/dicom-rle; transfer-syntax={RLE}"
    # As stored still wins when accepted, and nothing is made without a producer.
    assert select_frames("*/*", JPEG_BASELINE, producible=_makes_lossless).media_type == (
        "image/jpeg"
    )
    with pytest.raises(NotAcceptable):
        select_frames('multipart/related; type="image/jp2"', IMPLICIT,
                      producible=_makes_lossless)  # J2K has no encoder here
    with pytest.raises(NotAcceptable):
        select_frames(octet, MPEG4, producible=_makes_lossless)


# ---------------------------------------------------------------------------
# Frames and bulkdata


def test_native_frames_are_octet_stream_explicit_little_endian() -> None:
    for stored in (IMPLICIT, EXPLICIT_VR_LITTLE_ENDIAN, "1.2.840.10008.1.2.1.99"):
        for accept in (
            None,
            'multipart/related; type="application/octet-stream"',
            "multipart/related; type=application/octet-stream; transfer-syntax=*",
            f'multipart/related; type="application/octet-stream"; transfer-syntax={EXPLICIT_VR_LITTLE_ENDIAN}',
            "application/octet-stream",
            "*/*",
        ):
            rep = select_frames(accept, stored)
            assert rep.content_type == 'multipart/related; type="application/octet-stream"'
            assert rep.part_content_type == (
                f"application/octet-stream; transfer-syntax={EXPLICIT_VR_LITTLE_ENDIAN}"
            )
    with pytest.raises(NotAcceptable):
        select_frames('multipart/related; type="image/jpeg"', EXPLICIT_VR_LITTLE_ENDIAN)


def test_big_endian_frames_need_wildcard_or_named_syntax() -> None:
    octet = 'multipart/related; type="application/octet-stream"'
    with pytest.raises(NotAcceptable):
        select_frames(octet, EXPLICIT_VR_BIG_ENDIAN)
    rep = select_frames(f"{octet}; transfer-syntax=*", EXPLICIT_VR_BIG_ENDIAN)
    assert rep.transfer_syntax == EXPLICIT_VR_BIG_ENDIAN


def test_compressed_frames_in_their_image_type_by_default() -> None:
    for accept in (None, "*/*", 'multipart/related; type="image/jpeg"', "image/*", "image/jpeg"):
        rep = select_frames(accept, JPEG_BASELINE)
        assert rep.content_type == 'multipart/related; type="image/jpeg"'
        assert rep.part_content_type == f"image/jpeg; transfer-syntax={JPEG_BASELINE}"
    assert select_frames(None, J2K).media_type == "image/jp2"
    assert select_frames(None, RLE).media_type == "image/dicom-rle"
    assert select_frames('multipart/related; type="image/x-dicom-rle"', RLE).media_type == (
        "image/x-dicom-rle"
    )
    named = f'multipart/related; type="image/jpeg"; transfer-syntax={JPEG_BASELINE}'
    assert select_frames(named, JPEG_BASELINE).transfer_syntax == JPEG_BASELINE
    with pytest.raises(NotAcceptable):  # another JPEG process than the stored one
        select_frames(
            f'multipart/related; type="image/jpeg"; transfer-syntax={JPEG_LOSSLESS}', JPEG_BASELINE
        )


def test_compressed_frames_as_octet_stream_only_with_wildcard_or_stored_syntax() -> None:
    octet = 'multipart/related; type="application/octet-stream"'
    # Octet-stream alone means uncompressed: compressed frames cannot be sent (406).
    with pytest.raises(NotAcceptable) as caught:
        select_frames(octet, JPEG_BASELINE)
    assert "decompressed" in caught.value.message
    # OHIF's default Accept: octet-stream with transfer-syntax=*.
    ohif = "multipart/related; type=application/octet-stream; transfer-syntax=*"
    rep = select_frames(ohif, JPEG_BASELINE)
    assert rep.part_content_type == f"application/octet-stream; transfer-syntax={JPEG_BASELINE}"
    rep = select_frames(f"{octet}; transfer-syntax={RLE}", RLE)
    assert rep.media_type == "application/octet-stream"
    # q-values pick between acceptable offers.
    mixed = f"{ohif}; q=0.4, multipart/related; type=image/jpeg; q=0.8"
    assert select_frames(mixed, JPEG_BASELINE).media_type == "image/jpeg"
    mixed = f"{ohif}; q=0.9, multipart/related; type=image/jpeg; q=0.8"
    assert select_frames(mixed, JPEG_BASELINE).media_type == "application/octet-stream"


def test_video_has_no_frames() -> None:
    assert frame_offers(MPEG4) == []
    with pytest.raises(NotAcceptable) as caught:
        select_frames(None, MPEG4)
    assert "video" in caught.value.message


def test_bulkdata_is_octet_stream() -> None:
    for accept in (None, "*/*", 'multipart/related; type="application/octet-stream"'):
        rep = select_bulkdata(accept)
        assert rep.content_type == 'multipart/related; type="application/octet-stream"'
    with pytest.raises(NotAcceptable):
        select_bulkdata("image/jpeg")


# ---------------------------------------------------------------------------
# Metadata, rendered, thumbnail


def test_metadata_media_types() -> None:
    assert select_metadata(None).content_type == "application/dicom+json"
    assert select_metadata("application/dicom+json, application/json").media_type == (
        "application/dicom+json"
    )
    assert select_metadata("application/json").media_type == "application/json"
    assert select_metadata("application/*").media_type == "application/dicom+json"
    assert select_metadata("*/*").media_type == "application/dicom+json"
    assert select_metadata("application/dicom+json;q=0.2, application/json").media_type == (
        "application/json"
    )
    for refused in ("text/html", "image/*", "application/dicom", "multipart/related; "
                    'type="application/dicom"', "application/dicom+json;q=0"):
        with pytest.raises(NotAcceptable):
            select_metadata(refused)


def test_metadata_xml_is_multipart_and_never_the_default() -> None:
    xml = 'multipart/related; type="application/dicom+xml"'
    for accept in (xml, "application/dicom+xml", "multipart/related", "multipart/*",
                   f"{xml}, application/dicom+json;q=0.5",
                   f"application/dicom+json;q=0.4, {xml};q=0.9",
                   "application/dicom+xml, */*;q=0.1"):
        chosen = select_metadata(accept)
        assert (chosen.media_type, chosen.multipart) == ("application/dicom+xml", True), accept
        assert chosen.content_type == xml
    for accept in (None, "", "*/*", "application/*", f"{xml};q=0.5, application/dicom+json",
                   f"{xml}, application/dicom+json", f"*/*, {xml};q=0"):
        assert select_metadata(accept).media_type == "application/dicom+json", accept


def test_rendered_and_thumbnail_media_types() -> None:
    for choose in (select_rendered, select_thumbnail):
        assert choose(None).media_type == "image/jpeg"
        assert choose("*/*").media_type == "image/jpeg"
        assert choose("image/*").media_type == "image/jpeg"
        assert choose("image/png").media_type == "image/png"
        assert choose("image/jpeg;q=0.5, image/png").media_type == "image/png"
        assert choose("image/png;q=0.5, image/jpeg").media_type == "image/jpeg"
        assert choose("image/gif, image/*;q=0.1").media_type == "image/jpeg"
        for refused in ("image/gif", "application/dicom", 'multipart/related; type="image/jpeg"'):
            with pytest.raises(NotAcceptable):
                choose(refused)


def test_select_ties_go_to_the_first_offer_and_empty_offers_refuse() -> None:
    offers = [Representation("image/jpeg"), Representation("image/png")]
    assert select("image/png, image/jpeg", offers).media_type == "image/jpeg"
    with pytest.raises(NotAcceptable):
        select(None, [])
