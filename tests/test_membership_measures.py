"""The overlay measures used by the swarm tests and the benchmark, against hand-computed values."""

import pytest

from gossip.sim_swarm import chi_square, chi_square_critical, in_degrees, strongly_connected

A, B, C, D = b"a", b"b", b"c", b"d"


def test_strong_connectivity():
    assert strongly_connected({A: [B], B: [C], C: [A]})
    assert not strongly_connected({A: [B], B: [C], C: []})  # C reaches nobody
    assert not strongly_connected({A: [B], B: [A], C: [A]})  # nobody reaches C
    assert strongly_connected({A: [B, D], B: [A, D]})  # D is not a node: its edges are ignored
    assert strongly_connected({}) and strongly_connected({A: []})


def test_in_degrees_count_views_pointing_at_each_node():
    assert in_degrees({A: [B, C], B: [C, D], C: [A]}) == {A: 1, B: 1, C: 2}


def test_chi_square_statistic():
    assert chi_square([10, 20], [15, 15]) == pytest.approx(25 / 15 * 2)
    assert chi_square([3, 3, 3], [3.0, 3.0, 3.0]) == 0.0
    with pytest.raises(ValueError):
        chi_square([1, 2], [1.0])
    with pytest.raises(ValueError):
        chi_square([1], [0.0])


@pytest.mark.parametrize(
    "df, p, table",
    # The first two from printed tables; df = 999 from the incomplete gamma series (1142.848).
    [(10, 0.05, 18.307), (100, 0.001, 149.449), (999, 0.001, 1142.848)],
)
def test_chi_square_critical_values_match_tables(df, p, table):
    assert chi_square_critical(df, p) == pytest.approx(table, rel=2e-3)


def test_chi_square_critical_refuses_nonsense():
    with pytest.raises(ValueError):
        chi_square_critical(0, 0.05)
    with pytest.raises(ValueError):
        chi_square_critical(10, 1.0)
