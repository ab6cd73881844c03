"""Generate python/torchlora/data/topics.jsonl: short labelled sentences on four topics.

Deterministic (fixed seed): running it again reproduces the file byte for byte. Each sentence
joins a subject, an action and a detail drawn from per-topic word lists, so the topics are
clearly separable while no two sentences are identical.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TOPICS: dict[str, dict[str, list[str]]] = {
    "sports": {
        "subject": ["The striker", "Our goalkeeper", "The home team", "The coach", "A young sprinter",
                    "The tennis champion", "The rookie pitcher", "The captain", "The cycling squad",
                    "The visiting club", "The boxer", "The relay team"],
        "action": ["scored twice in", "was injured during", "celebrated after", "trained hard before",
                   "lost narrowly in", "set a new record at", "was substituted early in",
                   "dominated the second half of", "argued with the referee in", "qualified for"],
        "detail": ["the cup final", "last night's match", "the championship game", "the penalty shootout",
                   "the league opener", "the Olympic trials", "the derby", "the marathon",
                   "the semi-final", "the away fixture"],
    },
    "food": {
        "subject": ["The chef", "My grandmother", "The new bakery", "Our favourite bistro", "The food truck",
                    "The pastry cook", "A street vendor", "The sushi bar", "The pizzeria", "The cafe",
                    "The butcher", "The vegan kitchen"],
        "action": ["served a spicy version of", "slowly roasted", "baked a fresh batch of",
                   "added too much salt to", "sprinkled herbs over", "simmered", "grilled",
                   "invented a sweet twist on", "ran out of", "plated a generous portion of"],
        "detail": ["the tomato soup", "garlic bread", "the lemon tart", "a creamy risotto",
                   "chocolate cookies", "the lamb stew", "noodles with peanut sauce", "the apple pie",
                   "fried dumplings", "the mushroom pasta"],
    },
    "technology": {
        "subject": ["The startup", "The software team", "Our laptop", "The new smartphone", "The chip maker",
                    "The cloud provider", "An open source project", "The database", "The robot",
                    "The web browser", "The graphics card", "The app developer"],
        "action": ["released an update for", "patched a security bug in", "crashed while running",
                   "doubled the speed of", "added encryption to", "rewrote the code of",
                   "ran out of memory in", "shipped a beta of", "deprecated", "open-sourced"],
        "detail": ["the operating system", "its compiler", "the login server", "the mobile app",
                   "the neural network", "the storage driver", "the search engine", "the firmware",
                   "the payment API", "the video codec"],
    },
    "weather": {
        "subject": ["Heavy rain", "A cold front", "The storm", "Thick fog", "A heat wave", "Strong wind",
                    "The blizzard", "Light drizzle", "The hurricane", "Morning frost", "A thunderstorm",
                    "The monsoon"],
        "action": ["is expected to hit", "swept across", "flooded the streets of", "cooled down",
                   "brought snow to", "delayed flights over", "lingered above", "will clear from",
                   "knocked out power in", "moved slowly toward"],
        "detail": ["the coast tonight", "the northern valleys", "the city by noon", "the mountain passes",
                   "the islands this weekend", "the river basin", "the southern plains",
                   "the harbour at dawn", "the farmland", "the capital on Monday"],
    },
}
PER_TOPIC = 100
SEED = 20240611


def generate() -> list[dict[str, object]]:
    rng = random.Random(SEED)
    labels = sorted(TOPICS)
    rows: list[dict[str, object]] = []
    for label_id, label in enumerate(labels):
        words = TOPICS[label]
        seen: set[str] = set()
        while len(seen) < PER_TOPIC:
            text = f"{rng.choice(words['subject'])} {rng.choice(words['action'])} {rng.choice(words['detail'])}."
            if text not in seen:
                seen.add(text)
                rows.append({"text": text, "label": label, "label_id": label_id})
    rng.shuffle(rows)
    return rows


def main() -> None:
    out = Path(__file__).resolve().parents[1] / "python" / "torchlora" / "data" / "topics.jsonl"
    with open(out, "w", encoding="utf-8") as handle:
        for row in generate():
            handle.write(json.dumps(row) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
