"""kmsctl's pure pieces."""

from kmsd.kmsctl import az_warnings


def _nodes(*azs: str) -> list[dict[str, str]]:
    return [{"node_id": f"node-{i}", "az": az} for i, az in enumerate(azs, 1)]


def test_az_warning_when_a_majority_shares_an_az() -> None:
    assert az_warnings(_nodes("a", "b", "c")) == []
    assert az_warnings(_nodes("a", "a", "b", "c", "d")) == []
    warnings = az_warnings(_nodes("a", "a", "b"))
    assert len(warnings) == 1 and "AZ a holds 2 of 3 voters" in warnings[0]
    assert len(az_warnings(_nodes("a", "a", "a", "b", "c"))) == 1
