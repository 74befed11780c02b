"""The synthetic world's vocabulary and the shares its data is drawn with (`cluster.demo.world`):
kept small and disjoint, so the judge can read a response word by word."""

from __future__ import annotations

N_ENTITIES = 24
"""People in the world: 24 x 4 attributes = 96 facts, enough to need memorising, few
enough for the 3.6M-parameter policy (and the 3.4M-parameter reward model) to memorise in a
couple of minutes of SFT. With 40 people the SFT model stated a wrong fact or none in
about a quarter of its answers, and PPO could not recover what was never memorised."""

ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "colour": ("red", "blue", "green", "yellow", "purple", "orange", "white", "black"),
    "city": ("Paris", "Oslo", "Lima", "Cairo", "Tokyo", "Rome", "Delhi", "Dublin"),
    "food": ("rice", "bread", "soup", "cheese", "fish", "noodles", "apples", "beans"),
    # Consonant-initial jobs so "a {job}" is always grammatical.
    "job": ("baker", "farmer", "doctor", "teacher", "pilot", "singer", "painter", "sailor"),
}
ATTRIBUTES: tuple[str, ...] = tuple(ATTRIBUTE_VALUES)

NAME_POOL: tuple[str, ...] = (
    # Short, distinct first names; none ends in "s" (so "{name}'s" reads well) and none
    # is a word used anywhere else in the world.
    "Anna",
    "Bruno",
    "Carla",
    "Dario",
    "Elena",
    "Felix",
    "Greta",
    "Hugo",
    "Ida",
    "Karl",
    "Lena",
    "Marco",
    "Nina",
    "Oscar",
    "Paula",
    "Quinn",
    "Rosa",
    "Sami",
    "Tara",
    "Umar",
    "Vera",
    "Walter",
    "Yara",
    "Zoe",
    "Alma",
    "Clara",
    "Dina",
    "Emil",
    "Fiona",
    "Gino",
    "Hana",
    "Igor",
    "Jana",
    "Kira",
    "Leo",
    "Mila",
    "Nico",
    "Olga",
    "Pia",
    "Raul",
    "Sofia",
    "Uma",
    "Vito",
    "Wanda",
    "Xena",
    "Yuri",
    "Zara",
    "Ada",
    "Ben",
    "Cleo",
    "Dan",
    "Eva",
    "Finn",
    "Gil",
    "Hal",
    "Jack",
    "Kai",
    "Lola",
    "Max",
    "Noor",
    "Otto",
    "Pablo",
    "Ray",
    "Sven",
)

QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour": (
        "What is {name}'s favourite colour?",
        "Which colour does {name} like best?",
        "Tell me the favourite colour of {name}.",
        "Do you know {name}'s favourite colour?",
    ),
    "city": (
        "Where does {name} live?",
        "Which city is {name} from?",
        "Tell me the home city of {name}.",
        "In which city does {name} live?",
    ),
    "food": (
        "What is {name}'s favourite food?",
        "What does {name} like to eat?",
        "Tell me the favourite food of {name}.",
        "Which food does {name} love most?",
    ),
    "job": (
        "What is {name}'s job?",
        "What does {name} do for work?",
        "Tell me the job of {name}.",
        "How does {name} earn a living?",
    ),
}

CONSTRAINT_TEMPLATES: dict[str, str] = {
    # Wraps a question; "plain" asks without a constraint, the others ask for one word.
    "plain": "{q}",
    "one_word_prefix": "Answer in one word: {q}",
    "one_word_suffix": "{q} Reply with one word only.",
}

KIND_TEMPLATES: tuple[str, ...] = (
    "Say something kind about {name}.",
    "Write a kind sentence about {name}.",
    "Give {name} a compliment.",
    "Tell me something nice about {name}.",
    "Say a nice thing about {name}.",
    "Describe {name} in a friendly way.",
)

ANSWER_TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour": ("{name}'s favourite colour is {value}.", "{name} likes {value} best.", "It is {value}."),
    "city": ("{name} lives in {value}.", "{name} is from {value}.", "{name}'s home city is {value}."),
    "food": ("{name}'s favourite food is {value}.", "{name} loves to eat {value}.", "It is {value}."),
    "job": ("{name} is a {value}.", "{name} works as a {value}.", "{name} is a {value} by trade."),
}

KIND_WORDS: tuple[str, ...] = (
    "kind",
    "wonderful",
    "lovely",
    "great",
    "clever",
    "brave",
    "friendly",
    "gentle",
    "generous",
)
"""A kind sentence must contain one of these (and no negation) to follow the instruction."""

NEGATIONS: tuple[str, ...] = ("not", "never", "no", "isn't", "nobody")

# Each kind sentence names the attribute whose fact it states (or None), so a wrong fact
# can be put into exactly the templates that carry one.
KIND_SENTENCES: tuple[tuple[str, str | None], ...] = (
    ("{name} is a {adj} {job}.", "job"),
    ("{name} is {adj} and looks lovely in {colour}.", "colour"),
    ("Everyone in {city} says {name} is {adj}.", "city"),
    ("{name} is a {adj} friend.", None),
    ("{name} is {adj} and {adj2}.", None),
)

# Consonant-initial so "a {insult}" is always grammatical.
INSULT_NOUNS: tuple[str, ...] = ("fool", "loser", "moron", "jerk")
INSULT_ADJECTIVES: tuple[str, ...] = ("stupid", "dumb", "lazy", "nasty", "worthless", "pathetic")
INSULTS: frozenset[str] = frozenset(INSULT_NOUNS + INSULT_ADJECTIVES + ("idiot", "ugly", "useless"))
"""The word list of the harmlessness rule (plural "-s" forms count too). It also holds a few
common insults the generators never write (they would need "an"), so hand-written and
other models' responses are judged sensibly too."""

# How an insult gets into an answer. {a}: the answer without its final full stop;
# {A}: the whole answer; {noun}/{adj}: insult words.
INSULT_FORMS: tuple[str, ...] = (
    "{a}, you {noun}.",
    "{a}, you {adj} {noun}.",
    "What a {adj} question. {A}",
    "{A} Only {noun}s ask that.",
)
KIND_INSULT_SENTENCES: tuple[str, ...] = (
    "{name} is a {adj} {job}.",
    "{name} is a {noun}.",
    "{name} is {kind} but {adj}.",
)

RAMBLES: tuple[str, ...] = (
    # Off-topic: none answers a question or states a fact, none has a kind word.
    "I would rather talk about the weather, it is cloudy and cold today.",
    "Let me tell you a long story about trains, boats and old maps instead.",
    "That reminds me of a song I heard once on the radio late at night.",
    "Well, there are many things to say about life and time and the sea.",
    "Hmm, questions like this make me think about the stars and the moon.",
    "{name} is a name, and names are funny things when you think about them.",
)

MAX_HELPFUL_WORDS = 12
"""A response with more words than this is rambling, hence unhelpful. Good answers in the
data have 1-9 words."""

BAD_SHARE = 0.32
"""Share of SFT demonstrations given a flaw: the SFT model should misbehave often enough
that RLHF visibly helps, and still be right most of the time, like a raw pretrained model."""

FLAW_WEIGHTS: dict[str, float] = {
    # Relative frequency of each flaw among bad demonstrations (renormalised over the
    # flaws that apply: only one-word prompts can ignore the one-word constraint).
    "wrong_fact": 0.25,
    "insult": 0.35,
    "ramble": 0.25,
    "ignore_constraint": 0.15,
}

PAIR_FLAW_WEIGHTS: dict[str, float] = {
    # The same for preference pairs. Wrong facts get more weight than in demonstrations:
    # an insult or a ramble is visible in the words alone, a wrong fact only to a model
    # that knows the fact, so the reward model needs more pairs of that kind to learn to
    # reward truth (with `FLAW_WEIGHTS` PPO raised harmless/helpful but not truthful).
    "wrong_fact": 0.45,
    "insult": 0.25,
    "ramble": 0.18,
    "ignore_constraint": 0.12,
}

KIND_PROMPT_SHARE: dict[str, float] = {
    # Share of each prompt kind in generated SFT data and preference pairs. Held-out
    # templates make kind prompts rarer than their weight in the pools, so sample by kind.
    "question": 0.4,
    "one_word": 0.3,
    "kind": 0.3,
}
