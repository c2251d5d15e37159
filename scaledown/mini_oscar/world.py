"""A seeded synthetic fact world for the miniature OSCAR reproduction.

Made-up people (names built from syllables) have a handful of attributes (birthplace, birth year, employer,
favourite colour, instrument, pet, sport). Facts are written into short passages in several phrasings, and each
question asks one attribute of one person, with the gold passage hidden among distractor passages about other
people. People are split into train and test sets, so a test fact never appears in any training text: a model
can answer a test question only by reading (or decompressing) its documents, and closed-book accuracy stays
near chance.

Everything is drawn from `random.Random` instances seeded with strings (deterministic across processes and
platforms), so the same arguments always give byte-identical files.

    world = build_world(seed=0, num_entities=200)
    train = make_examples(world, "train", num_documents=5, questions_per_entity=4)
    test = make_examples(world, "test", num_documents=5, questions_per_entity=2)
    write_jsonl("train.jsonl", train)

Command line: ``python -m scaledown.mini_oscar.world --out DIR --seed 0 --num-entities 200``
(``--tiny-sample`` rewrites the sample files bundled in ``scaledown/sample_data``).
"""

import argparse
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

SPLITS = ("train", "test")
SAMPLE_DATA_DIR = Path(__file__).resolve().parent.parent / "sample_data"

# ----------------------------------------------------------------------------------------------------------------
# Vocabulary of the world.
# ----------------------------------------------------------------------------------------------------------------

NAME_SYLLABLES = (
    "ta", "mor", "eth", "vis", "san", "ni", "lo", "ren", "kel", "dra", "fen", "bri", "nor", "zan",
    "quil", "mar", "tho", "vel", "sil", "gan", "dor", "ith", "ven", "ka", "lis", "ro", "bel", "ush",
)
TOWN_SYLLABLES = ("durn", "ash", "brim", "cal", "hod", "wyn", "gar", "tull", "pell", "orm", "stav", "lun")
TOWN_SUFFIXES = ("ford", "mere", "holt", "wick", "dale", "moor", "brook", "haven")
COMPANY_SYLLABLES = ("quor", "vex", "zin", "bry", "ox", "lum", "dex", "nov", "kor", "pax", "tek", "ul")
COMPANY_SUFFIXES = ("Labs", "Works", "Systems", "Foods", "Motors")

# Real words for the attributes a reader can picture; one or two tokens each, none a substring of another.
COLOURS = ("teal", "amber", "crimson", "violet", "indigo", "olive", "scarlet", "maroon", "ochre", "turquoise")
INSTRUMENTS = ("oboe", "cello", "banjo", "harp", "tuba", "flute", "violin", "bassoon", "ukulele", "trumpet")
# Consonant-initial animals only, so that "a {pet}" is always grammatical.
PETS = ("parrot", "tortoise", "ferret", "hamster", "rabbit", "goldfish", "beagle", "pony", "gecko", "canary")
SPORTS = ("rowing", "fencing", "archery", "cycling", "skiing", "sailing", "climbing", "boxing", "surfing", "curling")

# Each attribute is written in several surface forms, so that the model learns the fact rather than a sentence.
# {name} is the person's full name, {value} the attribute's value (the answer span).
PASSAGE_TEMPLATES = {
    "birthplace": (
        "{name} was born in {value}.",
        "{name} comes from the town of {value}.",
        "The birthplace of {name} is {value}.",
        "{name} is a native of {value}.",
    ),
    "birth_year": (
        "{name} was born in the year {value}.",
        "The year of birth of {name} is {value}.",
        "In {value}, {name} was born.",
        "{name} has a birth year of {value}.",
    ),
    "employer": (
        "{name} works for {value}.",
        "{name} is employed by {value}.",
        "{name} has a job at {value}.",
        "The employer of {name} is {value}.",
    ),
    "colour": (
        "The favourite colour of {name} is {value}.",
        "{name} likes the colour {value} best.",
        "Of all colours, {name} prefers {value}.",
    ),
    "instrument": (
        "{name} plays the {value}.",
        "The instrument {name} plays is the {value}.",
        "{name} practises the {value} every day.",
    ),
    "pet": (
        "{name} owns a {value}.",
        "{name} has a pet {value}.",
        "{name} keeps a {value} at home.",
    ),
    "sport": (
        "{name} enjoys {value}.",
        "The favourite sport of {name} is {value}.",
        "{name} has taken up {value}.",
    ),
}
QUESTION_TEMPLATES = {
    "birthplace": (
        "Where was {name} born?",
        "Which town is {name} from?",
        "What is the birthplace of {name}?",
    ),
    "birth_year": (
        "In which year was {name} born?",
        "When was {name} born?",
        "What is the birth year of {name}?",
    ),
    "employer": (
        "Who does {name} work for?",
        "Which company employs {name}?",
        "Who is the employer of {name}?",
    ),
    "colour": (
        "What is the favourite colour of {name}?",
        "Which colour does {name} like best?",
        "What colour does {name} prefer?",
    ),
    "instrument": (
        "What instrument does {name} play?",
        "Which musical instrument does {name} play?",
        "What does {name} practise?",
    ),
    "pet": (
        "What pet does {name} have?",
        "Which animal does {name} keep?",
        "What kind of pet does {name} own?",
    ),
    "sport": (
        "What sport does {name} enjoy?",
        "Which sport has {name} taken up?",
        "What is the favourite sport of {name}?",
    ),
}
ATTRIBUTES = tuple(PASSAGE_TEMPLATES)

MIN_FACTS_PER_PASSAGE, MAX_FACTS_PER_PASSAGE = 2, 4
# Teacher-like rerank targets: the gold passage scores high; a distractor about the asked attribute (it looks
# relevant) scores just below zero, an unrelated one clearly below.
GOLD_RERANK_SCORE = 5.0
HARD_DISTRACTOR_SCORE_RANGE = (-2.0, -0.5)
EASY_DISTRACTOR_SCORE_RANGE = (-5.0, -2.5)

# ----------------------------------------------------------------------------------------------------------------
# The world.
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entity:
    """A made-up person and their facts (attribute -> value, every value a string)."""

    name: str
    facts: dict[str, str]


@dataclass
class World:
    """People, the value pool of each attribute, and the train/test split (disjoint sets of people)."""

    seed: int
    attributes: tuple[str, ...]
    value_pools: dict[str, tuple[str, ...]]
    entities: list[Entity]
    split_entities: dict[str, list[Entity]] = field(repr=False)

    def entities_of(self, split: str) -> list[Entity]:
        if split not in self.split_entities:
            raise ValueError(f"Unknown split {split!r}; use one of {SPLITS}.")
        return self.split_entities[split]

    def describe(self) -> dict:
        """Sizes and chance levels, for logs and reports."""
        return {
            "seed": self.seed,
            "num_entities": {split: len(people) for split, people in self.split_entities.items()},
            "pool_sizes": {attribute: len(self.value_pools[attribute]) for attribute in self.attributes},
            "closed_book_chance": round(chance_accuracy(self), 4),
        }


def build_world(
    seed: int = 0,
    num_entities: int = 200,
    eval_fraction: float = 0.2,
    num_towns: int = 16,
    num_companies: int = 12,
    birth_years: tuple[int, int] = (1950, 1999),
    name_syllables: Sequence[int] = (2, 3),
    attributes: Sequence[str] | None = None,
) -> World:
    """Draw `num_entities` people with random facts and split them into train and test by person.

    `eval_fraction` of the people (at least one) form the test split. `birth_years` is an inclusive range.
    Each first name and surname has a syllable count drawn from `name_syllables`: (2,) keeps names shortest in
    tokens; 3 syllables leave room for thousands of distinct people.
    `attributes` restricts the world to a subset of `ATTRIBUTES` (all by default).
    """
    attributes = tuple(attributes or ATTRIBUTES)
    unknown = [attribute for attribute in attributes if attribute not in PASSAGE_TEMPLATES]
    if unknown:
        raise ValueError(f"Unknown attributes {unknown}; choose from {ATTRIBUTES}.")
    if len(set(attributes)) < 2:
        # A passage states at least two facts, and an easy distractor must leave the asked attribute out.
        raise ValueError(f"A world needs at least two distinct attributes, got {attributes}.")
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}.")
    num_test = max(1, round(num_entities * eval_fraction))
    if num_entities - num_test < 1:
        raise ValueError(f"num_entities={num_entities} leaves no training people at eval_fraction={eval_fraction}.")

    rng = random.Random(f"mini-oscar-world:{seed}")
    value_pools = _draw_value_pools(rng, num_towns, num_companies, birth_years)
    value_pools = {attribute: value_pools[attribute] for attribute in attributes}
    all_values = [value for pool in value_pools.values() for value in pool]
    names = _draw_names(rng, num_entities, name_syllables, forbidden_substrings=all_values)
    entities = [
        Entity(name=name, facts={attribute: rng.choice(value_pools[attribute]) for attribute in attributes})
        for name in names
    ]
    shuffled = entities[:]
    rng.shuffle(shuffled)
    split_entities = {"test": shuffled[:num_test], "train": shuffled[num_test:]}
    return World(seed, attributes, value_pools, entities, split_entities)


def _draw_value_pools(
    rng: random.Random, num_towns: int, num_companies: int, birth_years: tuple[int, int]
) -> dict[str, tuple[str, ...]]:
    first_year, last_year = birth_years
    if first_year > last_year:
        raise ValueError(f"birth_years must be (first, last) with first <= last, got {birth_years}.")
    pools = {
        "birth_year": tuple(str(year) for year in range(first_year, last_year + 1)),
        "colour": COLOURS,
        "instrument": INSTRUMENTS,
        "pet": PETS,
        "sport": SPORTS,
    }
    # Made-up pools must not collide with any other value, or an answer could show up in a distractor.
    taken = [value for pool in pools.values() for value in pool]
    pools["birthplace"] = _draw_unique_words(
        rng, num_towns, lambda: _town_name(rng), forbidden_substrings=taken, what="town"
    )
    taken += pools["birthplace"]
    pools["employer"] = _draw_unique_words(
        rng, num_companies, lambda: _company_name(rng), forbidden_substrings=taken, what="company"
    )
    return pools


def _town_name(rng: random.Random) -> str:
    prefix = "".join(rng.choice(TOWN_SYLLABLES) for _ in range(rng.randint(1, 2)))
    return (prefix + rng.choice(TOWN_SUFFIXES)).capitalize()


def _company_name(rng: random.Random) -> str:
    core = "".join(rng.choice(COMPANY_SYLLABLES) for _ in range(2))
    return f"{core.capitalize()} {rng.choice(COMPANY_SUFFIXES)}"


def _draw_unique_words(rng, count, make_word, forbidden_substrings, what) -> tuple[str, ...]:
    """Draw `count` distinct values, none a substring of another value or of the template text, nor vice versa."""
    taken = [value.lower() for value in forbidden_substrings]
    words: list[str] = []
    for _ in range(count * 200):
        if len(words) == count:
            return tuple(words)
        candidate = make_word()
        lowered = candidate.lower()
        clashes = any(lowered in other or other in lowered for other in taken)
        if not clashes and lowered not in _TEMPLATE_TEXT:
            words.append(candidate)
            taken.append(lowered)
    if len(words) == count:
        return tuple(words)
    raise ValueError(f"Could not draw {count} distinct {what} names; ask for fewer.")


def _draw_names(
    rng: random.Random, count: int, name_syllables: Sequence[int], forbidden_substrings: Iterable[str]
) -> list[str]:
    """Draw `count` full names "First Last" with distinct first names.

    No first name is a suffix of another, so no full name can occur inside another ("Ren Volk" in "Faren
    Volk"); no name contains a value, so a name never leaks an answer into a distractor.
    """
    forbidden = [value.lower() for value in forbidden_substrings]
    first_names: set[str] = set()
    suffixes_of_first_names: set[str] = set()
    names: list[str] = []
    for _ in range(count * 200):
        if len(names) == count:
            break
        first, last = _syllable_word(rng, name_syllables), _syllable_word(rng, name_syllables)
        full = f"{first} {last}"
        lowered_first = first.lower()
        first_clashes = lowered_first in suffixes_of_first_names or any(
            lowered_first[i:] in first_names for i in range(len(lowered_first))
        )
        if first_clashes or any(value in full.lower() for value in forbidden):
            continue
        first_names.add(lowered_first)
        suffixes_of_first_names.update(lowered_first[i:] for i in range(len(lowered_first)))
        names.append(full)
    if len(names) < count:
        raise ValueError(f"Could not draw {count} distinct names from the syllable list; ask for fewer entities.")
    return names


def _syllable_word(rng: random.Random, name_syllables: Sequence[int]) -> str:
    syllables = [rng.choice(NAME_SYLLABLES)]
    for _ in range(rng.choice(name_syllables) - 1):
        # No syllable twice in a row: "Quilquil" reads as a stutter, not a name.
        syllables.append(rng.choice([s for s in NAME_SYLLABLES if s != syllables[-1]]))
    return "".join(syllables).capitalize()


_TEMPLATE_TEXT = " ".join(
    template.lower() for templates in (PASSAGE_TEMPLATES, QUESTION_TEMPLATES) for group in templates.values()
    for template in group
)

# ----------------------------------------------------------------------------------------------------------------
# Passages and questions.
# ----------------------------------------------------------------------------------------------------------------


def render_passage(entity: Entity, attributes: Sequence[str], rng: random.Random) -> str:
    """One sentence per attribute, each in a randomly chosen phrasing, in the given order."""
    sentences = [
        rng.choice(PASSAGE_TEMPLATES[attribute]).format(name=entity.name, value=entity.facts[attribute])
        for attribute in attributes
    ]
    return " ".join(sentences)


def _passage_about(entity: Entity, rng: random.Random, attributes: Sequence[str],
                   must_state: str | None, must_not_state: str | None = None) -> str:
    """A passage stating 2-4 facts of `entity`, including `must_state` and excluding `must_not_state`."""
    others = [a for a in attributes if a not in (must_state, must_not_state)]
    num_facts = rng.randint(MIN_FACTS_PER_PASSAGE, MAX_FACTS_PER_PASSAGE) - (must_state is not None)
    stated = rng.sample(others, min(num_facts, len(others)))
    if must_state is not None:
        stated.append(must_state)
    rng.shuffle(stated)
    return render_passage(entity, stated, rng)


def make_examples(
    world: World,
    split: str = "train",
    num_documents: int = 5,
    questions_per_entity: int = 3,
    seed: int = 0,
    hard_distractor_fraction: float = 1.0,
    fresh_facts: bool = False,
) -> list[dict]:
    """Questions about the people of one split, each with its gold passage hidden among distractors.

    Every person is asked `questions_per_entity` questions, about distinct attributes while they last (then the
    same facts again, in new phrasings and new passages). Distractors are passages about other people of the same
    split; a fraction `hard_distractor_fraction` of them state the asked attribute too (with a different value),
    so that the answer can only be found by matching the person's name. Examples come out shuffled.

    fresh_facts: every example draws new values for the people it mentions, so a model cannot learn the facts of
    the training people by heart and has to read them from the documents (closed-book stays at chance even on
    the training questions). Small generators trained from scratch otherwise memorise instead of learning to read.

    Each example: question, documents, answer, answers, relevance (1 for the gold passage), rerank_scores
    (teacher-like targets), plus entity and attribute for analysis.
    """
    people = world.entities_of(split)
    if num_documents < 1:
        raise ValueError(f"num_documents must be at least 1, got {num_documents}.")
    if len(people) < num_documents:
        raise ValueError(
            f"The {split} split has {len(people)} people but each question needs {num_documents} documents about "
            "distinct people; build a world with more entities or a larger eval_fraction."
        )
    rng = random.Random(f"mini-oscar-examples:{world.seed}:{split}:{seed}")
    examples = []
    for entity in people:
        for attribute in _attributes_to_ask(world.attributes, questions_per_entity, rng):
            examples.append(_make_example(world, people, entity, attribute, num_documents,
                                          hard_distractor_fraction, rng, fresh_facts))
    rng.shuffle(examples)
    return examples


def _attributes_to_ask(attributes: Sequence[str], count: int, rng: random.Random) -> list[str]:
    asked: list[str] = []
    while len(asked) < count:
        round_ = list(attributes)
        rng.shuffle(round_)
        asked.extend(round_)
    return asked[:count]


def _with_fresh_facts(world, person: Entity, rng: random.Random, avoid: dict[str, str] | None = None) -> Entity:
    """The same person with newly drawn values (never a value in `avoid`, attribute -> value)."""
    avoid = avoid or {}
    facts = {
        attribute: rng.choice([value for value in world.value_pools[attribute] if value != avoid.get(attribute)])
        for attribute in world.attributes
    }
    return Entity(name=person.name, facts=facts)


def _make_example(world, people, entity, attribute, num_documents, hard_distractor_fraction, rng,
                  fresh_facts=False) -> dict:
    if fresh_facts:
        entity = _with_fresh_facts(world, entity, rng)
    answer = entity.facts[attribute]
    gold = _passage_about(entity, rng, world.attributes, must_state=attribute)
    documents = [(gold, 1, GOLD_RERANK_SCORE)]
    for distractor_entity, is_hard in _pick_distractors(people, entity, attribute, num_documents - 1,
                                                        hard_distractor_fraction, rng):
        if fresh_facts:
            distractor_entity = _with_fresh_facts(world, distractor_entity, rng, avoid={attribute: answer})
        if is_hard:
            passage = _passage_about(distractor_entity, rng, world.attributes, must_state=attribute)
            score = rng.uniform(*HARD_DISTRACTOR_SCORE_RANGE)
        else:
            passage = _passage_about(distractor_entity, rng, world.attributes, must_state=None,
                                     must_not_state=attribute)
            score = rng.uniform(*EASY_DISTRACTOR_SCORE_RANGE)
        # Values are drawn collision-free, so this holds by construction; the check guards future edits.
        assert answer.lower() not in passage.lower(), (answer, passage)
        documents.append((passage, 0, round(score, 3)))
    rng.shuffle(documents)
    question = rng.choice(QUESTION_TEMPLATES[attribute]).format(name=entity.name)
    return {
        "question": question,
        "documents": [text for text, _, _ in documents],
        "answer": answer,
        "answers": [answer],
        "relevance": [relevant for _, relevant, _ in documents],
        "rerank_scores": [score for _, _, score in documents],
        "entity": entity.name,
        "attribute": attribute,
    }


def _pick_distractors(people, entity, attribute, count, hard_fraction, rng) -> list[tuple[Entity, bool]]:
    """`count` distinct other people, each flagged hard (states the asked attribute) or easy.

    A hard distractor needs a different value for the asked attribute, or the answer would appear in two
    documents. People are drawn by random index and rejected when unfit, which costs O(count) per question
    instead of a scan of the whole split (thousands of people); a scan is the fallback when most draws fail.
    """
    answer = entity.facts[attribute]
    num_hard = round(count * hard_fraction)
    chosen: list[tuple[Entity, bool]] = []
    used_names = {entity.name}

    def fits_as_hard(person: Entity) -> bool:
        return person.name not in used_names and person.facts[attribute] != answer

    def fits_as_easy(person: Entity) -> bool:
        return person.name not in used_names

    for is_hard in [True] * num_hard + [False] * (count - num_hard):
        fits = fits_as_hard if is_hard else fits_as_easy
        person = _draw_fitting(people, fits, rng)
        if person is None and is_hard:
            # Too few people with a different value (tiny worlds): fall back to an easy distractor.
            is_hard, person = False, _draw_fitting(people, fits_as_easy, rng)
        used_names.add(person.name)
        chosen.append((person, is_hard))
    return chosen


def _draw_fitting(people: Sequence[Entity], fits, rng: random.Random, max_draws: int = 50) -> Entity | None:
    for _ in range(max_draws):
        person = people[rng.randrange(len(people))]
        if fits(person):
            return person
    candidates = [person for person in people if fits(person)]
    return rng.choice(candidates) if candidates else None


def pretraining_texts(world: World, split: str = "train", passages_per_entity: int = 4, seed: int = 0) -> list[str]:
    """Plain passages (one fact set each, 2-4 facts) for auto-encoding / continuation pretraining.

    Defaults to the training people only, so that pretraining never sees a test fact; `split="all"` takes everyone.
    """
    people = world.entities if split == "all" else world.entities_of(split)
    rng = random.Random(f"mini-oscar-pretraining:{world.seed}:{split}:{seed}")
    texts = [
        _passage_about(entity, rng, world.attributes, must_state=None)
        for entity in people
        for _ in range(passages_per_entity)
    ]
    rng.shuffle(texts)
    return texts

# ----------------------------------------------------------------------------------------------------------------
# Chance levels: what closed-book guessing can reach.
# ----------------------------------------------------------------------------------------------------------------


def chance_accuracy(world: World, attribute: str | None = None) -> float:
    """Accuracy of a uniform guess from the attribute's value pool (averaged over attributes when None).

    Values are drawn uniformly, so no closed-book model can beat this in expectation on unseen people.
    """
    attributes = [attribute] if attribute is not None else list(world.attributes)
    return sum(1.0 / len(world.value_pools[a]) for a in attributes) / len(attributes)


def expected_chance_accuracy(world: World, examples: Sequence[dict]) -> float:
    """Uniform-guess accuracy on these examples (weights attributes by how often they are asked)."""
    if not examples:
        return 0.0
    return sum(chance_accuracy(world, example["attribute"]) for example in examples) / len(examples)


def majority_guess_accuracy(train_examples: Sequence[dict], eval_examples: Sequence[dict]) -> float:
    """Accuracy of answering each eval question with the most frequent training answer for its attribute.

    The best a closed-book model can learn from the training answers alone; on small sets it sits a little above
    the uniform chance level, so reports can quote both.
    """
    if not eval_examples:
        return 0.0
    answer_counts: dict[str, Counter] = {}
    for example in train_examples:
        answer_counts.setdefault(example["attribute"], Counter())[example["answer"]] += 1
    hits = 0
    for example in eval_examples:
        counts = answer_counts.get(example["attribute"])
        if counts and counts.most_common(1)[0][0] in example["answers"]:
            hits += 1
    return hits / len(eval_examples)

# ----------------------------------------------------------------------------------------------------------------
# Files.
# ----------------------------------------------------------------------------------------------------------------


def write_jsonl(path: str | Path, examples: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(json.dumps(example, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_lines(path: str | Path, lines: Iterable[str]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for line in lines:
            handle.write(line + "\n")


def write_dataset(
    out_dir: str | Path,
    world: World,
    num_documents: int = 5,
    train_questions_per_entity: int = 4,
    test_questions_per_entity: int = 2,
    passages_per_entity: int = 4,
    hard_distractor_fraction: float = 1.0,
    file_names: tuple[str, str, str] = ("train.jsonl", "test.jsonl", "pretrain.txt"),
) -> dict:
    """Write train / test examples and the pretraining text into `out_dir`; return a summary."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train = make_examples(world, "train", num_documents, train_questions_per_entity,
                          hard_distractor_fraction=hard_distractor_fraction)
    test = make_examples(world, "test", num_documents, test_questions_per_entity,
                         hard_distractor_fraction=hard_distractor_fraction)
    pretrain = pretraining_texts(world, "train", passages_per_entity)
    train_name, test_name, pretrain_name = file_names
    write_jsonl(out_dir / train_name, train)
    write_jsonl(out_dir / test_name, test)
    write_lines(out_dir / pretrain_name, pretrain)
    return {
        **world.describe(),
        "files": {train_name: len(train), test_name: len(test), pretrain_name: len(pretrain)},
        "num_documents": num_documents,
        "test_chance": round(expected_chance_accuracy(world, test), 4),
        "test_majority_guess": round(majority_guess_accuracy(train, test), 4),
    }


# The bundled demo data (`scaledown-train --preset tiny`): few short documents, small pools, a few hundred lines.
TINY_SAMPLE = {
    "world": dict(seed=0, num_entities=60, eval_fraction=0.15, num_towns=12, num_companies=10,
                  birth_years=(1970, 1999), name_syllables=(2,)),
    "dataset": dict(num_documents=3, train_questions_per_entity=5, test_questions_per_entity=3,
                    passages_per_entity=6,
                    file_names=("tiny_train.jsonl", "tiny_eval.jsonl", "pretrain_text.txt")),
}


def write_tiny_sample(out_dir: str | Path = SAMPLE_DATA_DIR) -> dict:
    """(Re)write the bundled sample files; the test suite checks that they match this function's output."""
    world = build_world(**TINY_SAMPLE["world"])
    return write_dataset(out_dir, world, **TINY_SAMPLE["dataset"])

# ----------------------------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Write a synthetic fact world: train.jsonl, test.jsonl, pretrain.txt.")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--tiny-sample", action="store_true",
                        help="write the bundled tiny sample files (fixed settings; the other options are ignored)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-entities", type=int, default=200)
    parser.add_argument("--eval-fraction", type=float, default=0.2)
    parser.add_argument("--num-towns", type=int, default=16)
    parser.add_argument("--num-companies", type=int, default=12)
    parser.add_argument("--num-documents", type=int, default=5)
    parser.add_argument("--train-questions-per-entity", type=int, default=4)
    parser.add_argument("--test-questions-per-entity", type=int, default=2)
    parser.add_argument("--passages-per-entity", type=int, default=4)
    parser.add_argument("--hard-distractor-fraction", type=float, default=1.0)
    args = parser.parse_args(argv)

    if args.tiny_sample:
        summary = write_tiny_sample(args.out)
    else:
        world = build_world(seed=args.seed, num_entities=args.num_entities, eval_fraction=args.eval_fraction,
                            num_towns=args.num_towns, num_companies=args.num_companies)
        summary = write_dataset(
            args.out, world,
            num_documents=args.num_documents,
            train_questions_per_entity=args.train_questions_per_entity,
            test_questions_per_entity=args.test_questions_per_entity,
            passages_per_entity=args.passages_per_entity,
            hard_distractor_fraction=args.hard_distractor_fraction,
        )
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
