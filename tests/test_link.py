"""Link emulation arithmetic and its command-line spellings."""
import pytest

from common.errors import ConfigError
from common.wire.link import LinkModel, parse_link


def test_delay_is_rtt_plus_bytes_over_rate():
    link = parse_link("10mbit,20ms")
    assert link == LinkModel(10e6, 0.020)
    assert link.delay_s(0, 0) == pytest.approx(0.020)
    # 125,000 bytes out and 125,000 back = 2 Mbit = 0.2 s at 10 Mbit/s.
    assert link.delay_s(125_000, 125_000) == pytest.approx(0.220)


@pytest.mark.parametrize("spec, rate, rtt", [
    ("1gbit,0.5ms", 1e9, 0.0005), ("512kbit,1s", 512e3, 1.0), ("2.5Mbit, 40ms", 2.5e6, 0.040),
    ("100bit,0s", 100.0, 0.0), ("1mbit,250us", 1e6, 250e-6),
])
def test_units(spec, rate, rtt):
    link = parse_link(spec)
    assert link.rate_bps == pytest.approx(rate) and link.rtt_s == pytest.approx(rtt)
    assert parse_link(str(link)) == link


@pytest.mark.parametrize("spec, words", [
    ("10mbit", "RATE,RTT"), ("10mb,20ms", "link rate"), ("fast,20ms", "link rate"), ("10mbit,20", "round-trip"),
    ("0mbit,20ms", "positive"), ("10mbit,-1ms", "round-trip"),
])
def test_bad_specs_are_one_clear_error(spec, words):
    with pytest.raises(ConfigError, match=words):
        parse_link(spec)
