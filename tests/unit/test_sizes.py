import pytest

from podpipe.model.sizes import format_size, parse_size


@pytest.mark.parametrize("text,expected", [
    ("2GiB", 2 * 2**30), ("512Mi", 512 * 2**20), ("1.5G", 1_500_000_000),
    ("1000000", 1_000_000), (4096, 4096), ("64 MB", 64_000_000), ("1kib", 1024),
])
def test_sizes_parse_in_binary_and_decimal_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-1GiB", "1 GiBs", "0", True, 0, "1e9"])
def test_nonsense_sizes_are_refused(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_sizes_format_in_binary_units():
    assert format_size(1536 * 2**20) == "1.5 GiB"
    assert format_size(12) == "12 B"


@pytest.mark.parametrize("text,expected", [
    ("512Mi", 512 * 2**20), ("1Gi", 2**30), ("2G", 2 * 10**9), ("512M", 512 * 10**6),
    ("0.5Gi", 2**29), ("100k", 100_000), ("1Pi", 2**50),
])
def test_sizes_follow_kubernetes_quantities(text, expected):
    assert parse_size(text) == expected


def test_a_lone_m_is_refused_saying_what_to_write():
    with pytest.raises(ValueError, match=r"'m' is milli in Kubernetes.*write 512Mi"):
        parse_size("512m")


def test_a_fraction_of_a_byte_is_refused_saying_what_to_write():
    with pytest.raises(ValueError, match=r"'0.5' is not a whole number of bytes: give a "
                                         r"unit, e.g. 0.5Gi"):
        parse_size("0.5")
