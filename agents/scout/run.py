"""scout, scripted: what a model following AGENT.md would do, with no model in the loop."""

import json
import os
import subprocess
import sys

FINDINGS = """Quorum queues suit agent mail: durable, replicated, and with a delivery
limit that dead-letters a message that keeps failing instead of looping.
Streams suit the changelog: cheap appends, reads from any offset."""


def covey(*args: str) -> str:
    done = subprocess.run(["covey", *args], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"covey {args[0]} failed with exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def main() -> None:
    me = f"agent:{os.environ['COVEY_AGENT']}"
    inbox = json.loads(covey("inbox", "--json"))
    print(f"inbox: {len(inbox)} message(s)")
    for mail in inbox:
        if mail["sender"] == me:  # my own post to my team came back to me too
            covey("done", mail["id"])
            continue
        message = json.loads(covey("read", mail["id"], "--json"))
        print(f"read {message['subject']!r} from {message['sender']}")
        if message["sender"].startswith("human:"):
            covey("send", "team:research", "Findings: queues for agent mail", "--body", FINDINGS)
            print("sent findings to team:research")
            covey("log", "add", "Recommended quorum queues for mail", "--tag", "research")
            print("logged the change for everyone's next digest")
            covey("reply", mail["id"], "--body", "Findings are out to team:research.")
            print(f"replied to {message['sender']} in the same thread")
        covey("done", mail["id"])


if __name__ == "__main__":
    main()
