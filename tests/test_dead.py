"""`covey dead`: every dead or unroutable letter with its reason; replay and purge."""

from __future__ import annotations

from datetime import timedelta

import pytest
from conftest import Raw, World


@pytest.fixture
async def dead_letters(world: World, raw: Raw, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """One dead letter of each kind; reason -> message id (where it has one)."""
    world.extra_env["COVEY_DELIVERY_LIMIT"] = "1"
    monkeypatch.setenv("COVEY_DELIVERY_LIMIT", "1")  # for the Python API below, too
    world.ok("topology", "apply")
    await raw.publish("agent.scout", b"junk", message_id="junk-0001")  # invalid
    poison = world.ok("send", "writer", "poison").strip()
    await raw.fail_deliveries("agent.writer", times=2)
    async with world.open("human:ada") as ada:
        stale = await ada.send("loner", "stale", expires_in=timedelta(milliseconds=1))
    lost = world.covey("send", "agent:nobody", "lost")
    assert lost.returncode == 3
    world.json("inbox", "--as", "scout")  # drains the junk into covey.dead
    world.json("inbox", "--as", "loner")  # the broker expires the stale one at the head
    return {"invalid": "junk-0001", "delivery-limit": poison, "expired": stale.id}


async def test_every_kind_of_dead_letter_is_listed_with_its_reason(
    world: World, raw: Raw, dead_letters: dict[str, str]
) -> None:
    ids = dead_letters
    letters = world.json("dead", "list")
    by_reason = {x["reason"]: x for x in letters}
    assert set(by_reason) == {"invalid", "delivery-limit", "expired", "unroutable"}
    assert by_reason["invalid"]["routing_key"] == "agent.scout"
    assert by_reason["delivery-limit"]["id"] == ids["delivery-limit"]
    assert by_reason["delivery-limit"]["routing_key"] == "agent.writer"
    assert by_reason["expired"]["id"] == ids["expired"]
    assert by_reason["unroutable"]["routing_key"] == "agent.nobody"
    assert all(x["dead_at"] for x in letters)
    # Listing took nothing away.
    assert await raw.count("covey.dead") == 3 and await raw.count("covey.unrouted") == 1
    assert world.json("dead") == letters


def test_show_gives_the_whole_letter(world: World, dead_letters: dict[str, str]) -> None:
    shown = world.json("dead", "show", "junk")
    assert shown["body"] == "junk" and shown["reason"] == "invalid"
    assert "type property is None" in shown["detail"]


def test_replay_sends_a_letter_to_its_recipient_again(
    world: World, dead_letters: dict[str, str]
) -> None:
    ids = dead_letters
    world.json("inbox", "--as", "writer")
    replayed = world.json("dead", "replay", ids["delivery-limit"][:8])
    assert replayed == {"replayed": [ids["delivery-limit"]]}
    assert [m["subject"] for m in world.json("inbox", "--as", "writer")] == ["poison"]
    assert ids["delivery-limit"] not in {x["id"] for x in world.json("dead")}
    assert len(world.json("dead")) == 3


def test_bad_ids_change_nothing(world: World, dead_letters: dict[str, str]) -> None:
    before = world.json("dead")
    assert world.covey("dead", "replay", "zzzzzz").returncode == 2
    assert world.covey("dead", "replay", "ab").returncode == 2
    assert world.json("dead") == before


def test_purge_drops_only_letters_older_than_asked(
    world: World, dead_letters: dict[str, str]
) -> None:
    assert world.json("dead", "purge", "--older-than", "1h") == {"purged": []}
    assert len(world.json("dead")) == 4
    purged = world.json("dead", "purge", "--older-than", "0s")
    assert len(purged["purged"]) == 4
    assert world.json("dead") == []


def test_a_namespace_without_dead_letter_queues_says_so_in_one_line(world: World) -> None:
    result = world.covey("dead")  # nobody ran `covey topology apply` here
    assert result.returncode == 2
    assert "covey topology apply" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
