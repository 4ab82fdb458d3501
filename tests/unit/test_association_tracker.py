"""agent/ingest/scp.py AssociationTracker: the study-completion sweep waits for a study only while
an association that brought instances of it is open, not for every association of the same AE
(a PACS routing study after study keeps one open nearly all the time)."""

from __future__ import annotations

from agent.ingest.scp import AssociationTracker


def test_a_study_is_receiving_only_while_an_association_that_carried_it_is_open() -> None:
    t = AssociationTracker()
    t.opened(1)
    t.carried(1, "1.2.3")
    t.opened(2)  # the same PACS, already sending the next study
    t.carried(2, "1.2.4")
    assert t.receiving("1.2.3") and t.receiving("1.2.4") and not t.receiving("1.2.5")
    t.closed(1)
    assert not t.receiving("1.2.3")  # done, although the PACS still has an association open
    assert t.receiving("1.2.4")
    t.carried(2, "1.2.3")  # a late instance of the first study on the open one
    assert t.receiving("1.2.3")
    t.closed(2)
    assert not t.receiving("1.2.3") and not t.receiving("1.2.4")


def test_an_instance_on_an_association_it_does_not_know_is_ignored() -> None:
    t = AssociationTracker()
    t.carried(7, "1.2.3")  # e.g. the association closed meanwhile
    assert not t.receiving("1.2.3")
    t.closed(7)  # closing one it never saw is harmless
