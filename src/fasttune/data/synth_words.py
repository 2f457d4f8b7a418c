"""The word lists and prompt phrasings of the built-in synthetic corpus (data/synth.py composes the
sayings from them). Data, not code: each table is written as the text it holds, parsed once at import."""

from __future__ import annotations

from collections.abc import Sequence


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


def _phrases(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split("|") if p.strip())


def _sections(text: str) -> list[tuple[str, str]]:
    """The word lists below are written as lines "head: body"; -> [(head, body), ...]."""
    lines = (line.partition(":") for line in text.strip().splitlines())
    return [(head.strip(), body) for head, _, body in lines]


def _word_table(text: str) -> dict[str, tuple[str, ...]]:
    """Lines "key: word word ..." -> {key: words}, the lines of a repeated key joined."""
    table: dict[str, tuple[str, ...]] = {}
    for key, words in _sections(text):
        table[key] = table.get(key, ()) + _words(words)
    return table


def _tagged(text: str) -> tuple[tuple[str, str], ...]:
    """Lines "theme: phrase | phrase | ..." -> ((phrase, theme), ...)."""
    return tuple((phrase, theme) for theme, phrases in _sections(text) for phrase in _phrases(phrases))


def _polar(text: str) -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]:
    """Lines "theme: good | ... / bad | ..." -> (good (phrase, theme) pairs, bad pairs)."""
    good: list[tuple[str, str]] = []
    bad: list[tuple[str, str]] = []
    for theme, phrases in _sections(text):
        ups, _, downs = phrases.partition("/")
        good += [(phrase, theme) for phrase in _phrases(ups)]
        bad += [(phrase, theme) for phrase in _phrases(downs)]
    return tuple(good), tuple(bad)


# What an adjective or a predicate may be said of: "a lame goat" and "a cracked jug", never "a cracked
# goat" or "a lame jug". Deals (debts, loans, ...) are things one owes, not holds.
_KINDS = ("animal", "crop", "thing", "deal")


def _kinded(text: str, keys: Sequence[str] = _KINDS) -> dict[str, tuple[tuple[str, str], ...]]:
    """Lines "key/theme: phrase | ..." (theme optional; key "any" is every key) -> {key: pairs}."""
    pools: dict[str, list[tuple[str, str]]] = {key: [] for key in keys}
    for head, phrases in _sections(text):
        key, _, theme = head.partition("/")
        for k in keys if key == "any" else (key,):
            pools[k].extend((phrase, theme) for phrase in _phrases(phrases))
    return {key: tuple(pool) for key, pool in pools.items() if pool}


def _kinded_words(text: str, keys: Sequence[str] = _KINDS) -> dict[str, tuple[str, ...]]:
    return {key: tuple(p for p, _ in pool) for key, pool in _kinded(text, keys).items()}


# --- nouns --------------------------------------------------------------------------------------
# Only nouns with regular plurals (-s, -es, consonant -y -> -ies), so that `_plural` needs no
# exception table and a prompt about "pennies" still names the source word "penny".
NOUNS = _word_table("""
    animal: goat horse cow hen dog donkey mule pig rooster duck lamb colt pony bull ram rabbit hound camel
    animal: mare heifer pigeon hawk bee cat falcon swan crow owl hare piglet
    blade: axe sickle scythe saw chisel hoe spade plow hatchet razor adze billhook sword
    gear: net boat cart wheel rope bucket ladder basket sack sail barrel saddle yoke trap lantern lamp
    gear: kettle pot jug boot cloak coat loom spindle oar anchor fiddle drum bell sieve churn
    crop: seed vine sapling bean turnip onion cabbage pumpkin melon apple pear plum cherry grape fig olive
    crop: walnut acorn berry rose hedge
    house: roof door gate fence wall well bridge hearth chimney window cellar barn stable shed mill oven
    house: table shutter
    money: coin purse penny debt loan wage bargain
""")
_NOUN_CLASS = {noun: cls for cls, nouns in NOUNS.items() for noun in nouns}
_ALL_NOUNS = tuple(_NOUN_CLASS)
_DEALS = frozenset(_words("debt loan wage bargain"))
_KIND = {
    n: c if c in ("animal", "crop") else "deal" if n in _DEALS else "thing" for n, c in _NOUN_CLASS.items()
}
# Things one can hold, lend, carry off or show: not debts, and not roofs, walls or mills either.
_HELD = tuple(n for n in _ALL_NOUNS if _KIND[n] != "deal" and _NOUN_CLASS[n] != "house")
_CREATURES_AND_THINGS = tuple(n for n in _HELD if _KIND[n] != "crop")
# A rival in "Better a ... than a ..." is of the same class and kind: a goat against a horse.
_RIVALS = {noun: tuple(m for m in NOUNS[_NOUN_CLASS[noun]] if _KIND[m] == _KIND[noun]) for noun in _HELD}

# "verb/number: objects": the things a verb is done to, so that "sharpens his axe" and "feeds her
# goats" are composed but "waters his axe" is not. Number "pl" when only the plural reads right
# ("counts his hens"), "sg" when only the singular does ("sweeps the hearth"), else either.
# Flattened to (verb, noun, number) so that each pair is equally likely: a uniform draw over the pairs
# spreads the sayings more evenly than verb-then-noun would, which is what keeps collisions rare.
_VERB_OBJECTS = tuple(
    (verb, noun, number)
    for head, nouns in _word_table("""
    sharpen/any: axe sickle scythe saw chisel hoe spade plow hatchet razor adze billhook sword
    oil/any: saw chisel plow hatchet sword wheel cart lantern gate saddle boot
    mend/any: net sail rope basket sack cart wheel fence roof gate wall boot cloak coat saddle bridge
    mend/any: ladder sieve barrel bucket churn
    patch/any: sail sack boot cloak coat roof net basket
    check/any: rope ladder anchor wheel cart boat net saddle roof chimney well bridge trap
    clean/any: lantern lamp kettle pot jug chisel saw sieve churn chimney oven well barrel bucket
    feed/any: goat horse cow hen dog donkey mule pig rooster duck lamb colt pony bull ram rabbit hound
    feed/any: camel mare heifer pigeon hawk bee cat falcon swan crow owl hare piglet
    water/any: horse cow goat mule donkey camel lamb colt pony bull heifer mare pig
    water/any: vine sapling bean turnip cabbage pumpkin melon rose hedge
    count/pl: goat hen lamb pig duck pigeon rooster coin penny debt apple plum walnut melon
    tend/any: goat cow lamb horse mare heifer colt pony pig bee vine sapling rose hedge
    guard/any: hen lamb goat duck bee purse coin barn gate well
    shelter/any: lamb colt heifer pony goat hen duck pigeon
    brush/any: horse mare colt pony mule donkey dog cat
    train/any: dog hound colt pony falcon hawk horse
    plant/pl: seed bean turnip onion cabbage pumpkin melon vine sapling rose hedge
    prune/any: vine sapling rose hedge
    pick/pl: apple pear plum cherry grape fig olive berry
    gather/pl: walnut acorn berry apple seed olive fig
    store/pl: apple pear onion turnip cabbage pumpkin seed walnut
    repair/sg: roof door gate fence wall well bridge chimney window shutter mill oven barn stable shed
    repair/sg: table cart wheel boat
    sweep/sg: hearth chimney cellar barn stable shed
    save/pl: coin penny
    pay/pl: debt loan wage
    mind/any: purse coin penny bargain
    tar/any: boat rope barrel roof
    fill/any: barrel bucket sack basket jug lamp lantern
    bar/sg: door gate shutter window
    milk/any: cow goat
    tune/any: fiddle drum bell
    """).items()
    for verb, _, number in [head.partition("/")]
    for noun in nouns
)

# The categories that category-seeded prompts ask about: every moral below is written for one.
THEMES = (
    "patience", "family", "hard work", "the weather", "money", "friendship", "honesty", "pride",
    "greed", "caution", "thrift", "kindness", "home", "luck", "neighbors", "foresight", "haste",
    "wisdom", "trust",
)  # fmt: skip

# Phrase lengths below are capped per slot so that every family composes 8 to 16 words.
# --- better_than: "Better a lean goat of your own than a fat horse bought on credit." ---------------
_HUMBLE = _word_table("""
    animal: small humble thin plain old lean slow quiet poor simple little modest lame shabby tired homely
    animal: muddy scrawny
    crop: small plain crooked thin lean poor simple little modest bruised sour wrinkled homely knobbly
    thing: small humble thin plain crooked old patched cracked short narrow poor worn simple rough bare
    thing: little modest shabby homely muddy dented
""")
_GRAND = _word_table("""
    animal: fat fine proud fast great tall handsome splendid fancy sleek mighty famous costly prize
    crop: fat golden fine great tall handsome splendid fancy shining famous costly prize plump perfect
    crop: glossy
    thing: golden grand fine shining great tall painted silver handsome splendid fancy new polished gilded
    thing: costly famous
""")
_BETTER_GOOD = _tagged("""
    thrift: in your own hand | in your own yard | bought with saved coins | saved for winter
    friendship: shared with a friend | lent by a friend | that a friend gave
    money: that is paid for | owned outright | bought with cash
    honesty: earned by honest sweat | won fairly | got honestly | with a clear conscience
    home: kept at home | enjoyed in peace | in a quiet house | by your own fire
    kindness: given freely | given with a smile
    hard work: you earned yourself | that serves you well | of your own | well looked after
    family: blessed by your mother | kept in the family | from your father's hand
    pride: that nobody envies | that nobody notices
    caution: near at hand | that you know well
""")
_BETTER_BAD = _phrases(
    "in a stranger's field | bought on credit | that belongs to another | promised for tomorrow | "
    "won by a lie | got by quarreling | borrowed from a neighbor | that everyone envies | kept for show | "
    "far over the hills | owed to the moneylender | that brings quarrels | taken by force | "
    "begged at the gate | won at dice | shown off at fairs | still at the market | "
    "that nobody trusts | across the river | bought with borrowed money | watched night and day | "
    "in a quarrelsome house | gained by a trick | that shames its owner"
)

# --- he_who: "He who sharpens his axe before the frost need not fear the long nights." --------------
_HE_WHO_SUBJECTS = (("He who", "his"), ("She who", "her"))
_WHEN = _phrases(
    "before the frost | at first light | in the spring | while the sun shines | before the storm | "
    "in fair weather | every evening | before market day | before the rains | while others sleep | "
    "in the slow months | before the first snow | after every journey | each morning | "
    "before the feast | when nobody is watching | in summer heat | before the wind turns | "
    "before the harvest | at each day's end | in the long days | before winter comes"
)
_HE_WHO_RESULTS = _tagged("""
    hard work: will never go hungry in winter | eats bread while others beg | wakes to a full table
    hard work: walks to market with a light heart | will not weep at harvest | sleeps while the idle worry
    hard work: buys peace with a little sweat | rarely needs to ask for help
    foresight: sleeps soundly when the storm comes | need not fear the long nights | fears no empty winter
    foresight: greets the spring well fed | saves a week of sorrow
    the weather: will laugh when the rains come | is never caught out by the frost
    the weather: loses nothing to the storm | has nothing to fear from the weather
    neighbors: never borrows from a neighbor | is never a burden on the street
    thrift: keeps the wolf from the door | never waits on strangers' kindness
    kindness: has bread to share in hard times | will have plenty to give away
    money: sells at the best price | owes nothing to anyone | is rich without knowing it
    friendship: is welcome at every fire | never lacks a friend at the gate
    luck: needs no luck | makes luck out of hard days
    wisdom: is counted wise in the village | learns what books cannot teach
    pride: will outlast the proud and the lazy | has no need to boast
    patience: makes a friend of every season | finds the road shorter than others
    family: leaves a full house to the children | keeps the family fed through winter
    home: is never shamed before guests | will never stand in the rain
""")

# --- never_before: "Never praise a young horse before the harvest is in." ---------------------------
# Number and determiner: "own" (your X, your Xs, a X), "new" for what is not yet yours (a X, Xs),
# "pl" (your Xs) for "count".
_JUDGE_VERBS = (
    ("praise", "own"), ("judge", "own"), ("trust", "own"), ("buy", "new"), ("sell", "own"),
    ("boast of", "own"), ("curse", "own"), ("count", "pl"), ("mock", "new"), ("envy", "new"),
    ("pay for", "new"), ("show off", "own"),
)  # fmt: skip
_FRESH = _word_table("""
    animal: young fine handsome strong gentle clever fast sturdy cheerful eager tame fat quiet loud
    animal: promising costly foreign sleek proud lively
    crop: young green sweet ripe early fat promising fine handsome foreign rare tall plump
    thing: new fine cheap shiny painted handsome strong sturdy costly foreign untested polished fancy
    deal: new fine cheap easy quick small large generous sudden
""")
_NEVER_UNTIL = _tagged("""
    patience: before the harvest is in | before the frost has passed | before the third winter
    patience: before the moon has turned | before the summer is over | before the year has turned
    patience: before the seasons change | before a full year of use | before the second spring
    patience: before the swallows return
    caution: before the river has gone down | before the long road home | before you have walked the fields
    wisdom: before you have slept on the matter | before the old folks have spoken
    trust: before you know the seller | before the seller has been paid
    money: before the market closes | before you have counted the cost | before the debts are paid
    the weather: before the first storm | before the rain has come and gone | before the ice has broken
    the weather: before the wind has shown its face
    neighbors: before your neighbors have had their say
    hard work: before the work is done | before the fields are ploughed
    haste: before the dust has settled | before the bread has cooled
    family: before the wedding is over | before your mother has given her word
    home: before the guests have gone home
    pride: before the fair is over
    foresight: before the hard months
    friendship: before a friend has given advice
""")

# --- where_there_is: "Where there are idle hands, there is always an empty barn." ------------------
_AGENTS = _words(
    "farmer shepherd baker miller weaver smith neighbor servant cook son daughter guest host tailor "
    "potter carpenter hunter sailor mother father brother sister elder widow merchant peddler beggar "
    "king judge soldier stranger traveler friend cousin uncle aunt master apprentice herder hand"
)
# "theme: good traits / bad traits". A good trait is followed by a good state ("a patient shepherd ...
# a warm stable"), a bad one by a bad state, so that the moral points the right way.
_GOOD_TRAITS, _BAD_TRAITS = _polar("""
    hard work: busy | willing | early / idle | lazy | sleepy
    patience: patient | steady / restless
    honesty: honest / lying
    caution: careful | watchful / careless
    thrift: thrifty / wasteful
    kindness: gentle | kind | generous /
    greed: / greedy | grasping
    pride: humble / proud | boastful
    wisdom: wise | sober / foolish
    home: cheerful / loud | drunken
    trust: faithful /
    friendship: loyal /
    neighbors: / quarrelsome
    family: / jealous | stubborn
    haste: / hasty
""")
_TRAITS = tuple((t, theme, True) for t, theme in _GOOD_TRAITS) + tuple(
    (t, theme, False) for t, theme in _BAD_TRAITS
)
# (good state, bad state, things the pair fits): "a leaking roof", never "a leaking purse".
_STATES = (
    ("full", "empty", _words("barn pot purse cupboard cellar jar basket cart granary loft sack larder")),
    ("warm", "cold", _words("hearth house kitchen cottage stable oven bed room")),
    ("mended", "broken", _words("roof fence cart basket boat cradle gate net wheel")),
    ("sturdy", "sagging", _words("roof fence barn house cottage bridge wall shed")),
    ("swept", "dirty", _words("hearth yard kitchen stable floor doorstep")),
    ("dry", "leaking", _words("roof cellar boat barn loft bucket")),
    ("bright", "dark", _words("lamp window house kitchen lantern hearth")),
    ("straight", "crooked", _words("fence furrow row hedge path")),
    ("green", "bare", _words("field garden pasture orchard meadow")),
    ("sound", "rotten", _words("roof barn beam floor gate boat")),
    ("fat", "lean", _words("purse pig goat larder harvest")),
    ("quiet", "noisy", _words("house table kitchen yard")),
)
_STATE_THINGS = tuple((good, bad, thing) for good, bad, things in _STATES for thing in things)
# (pattern, same?): `same` means the state has the trait's polarity ("always a full barn"),
# otherwise the opposite one, negated ("never an empty barn").
_WHERE_RESULTS = (
    ("there is always {np}", True), ("you will find {np}", True), ("there will soon be {np}", True),
    ("the {thing} is always {state}", True), ("there is seldom {np}", False), ("there is never {np}", False),
    ("no {thing} stays {state} for long", False),
)  # fmt: skip

# --- the_x_that: "The quiet horse that everyone admires is the first to be stolen." -----------------
_PLAIN = _word_table("""
    animal: old young proud quiet little fine big small handsome clever sleek tall grey red favorite
    animal: famous
    thing: old new little fine plain red grey big small handsome shiny painted famous favorite
""")
_THAT_GOOD = _kinded("""
    any/pride: nobody praises | nobody boasts about
    any/thrift: asks for little | was bought second hand
    any/neighbors: is shared with neighbors
    any/hard work: is looked after
    thing/hard work: is mended in time
    thing/foresight: is kept out of the rain | is ready before it is needed
    thing/caution: is used with care
    animal/hard work: works without complaint | is fed before dawn
    animal/kindness: is treated kindly | is brushed every evening
""")
_THAT_BAD = _kinded("""
    any/pride: is praised too often | everyone admires | is kept only for show
    any/caution: nobody watches
    any/neighbors: is borrowed too often
    any/haste: is bought in haste
    thing/foresight: is left in the rain
    thing/hard work: is never used
    thing/pride: shines the brightest
    animal/pride: makes the most noise
    animal/hard work: rests all summer | is never worked
    animal/caution: wanders from the yard
    animal/greed: eats the most
""")
_THAT_GOOD_ENDS = _kinded_words("""
    any: earns its keep | is there when you need it | grows dearer every year | brings the house luck
    any: is worth its weight in gold | serves through many winters
    thing: lasts the longest | outlives its maker | is the last to break
    animal: carries the heaviest load | never fails on the road | lives to a great age
""")
_THAT_BAD_ENDS = _kinded_words("""
    any: is the first to be stolen | fails on the day of need | is seldom the best
    any: costs more than it is worth | disappoints its master | is of no use in winter
    thing: is the first to break | is lost before winter | wears out before its time
    animal: brings no bread home | is the first to go lame | is gone by the spring
    animal: runs off at the first storm
""")

# --- a_adj_noun: "A borrowed axe never comes back the same in the end." -----------------------------
_ADJ_GOOD = _kinded("""
    any/family: cherished
    any/friendship: shared | trusted
    any/pride: humble
    thing/hard work: mended | patched | oiled
    thing/foresight: sturdy
    animal/hard work: tended | willing
    animal/patience: steady | patient
    animal/trust: faithful
    animal/home: contented
""")
_ADJ_BAD = _kinded("""
    any/neighbors: borrowed
    any/honesty: stolen
    any/hard work: neglected | idle
    any/haste: hurried
    thing/foresight: forgotten | rusty | cracked
    thing/thrift: cheap
    animal/hard work: lazy
    animal/haste: restless
    animal/family: stubborn
    animal/greed: greedy | hungry
""")
_VP_GOOD = _kinded_words("""
    any: does the work of two | is worth more than a new one | never lets its master down
    any: pays for itself twice | is a friend in hard times | brings luck to the house | earns its bread
    any: asks for nothing more | outlasts the finest silver | is worth two at the market
    animal: finds its way home | gives more than it takes
    thing: serves three generations
""")
_VP_BAD = _kinded_words("""
    any: costs more than it saves | never comes back the same | is soon forgotten
    any: brings no luck to the house | makes a poor bargain | serves no one well | earns no thanks
    any: shames its owner | is trouble twice over
    thing: gathers dust and debts | breaks on the busiest day | fails when most needed
    animal: always wants more | eats more than it earns | strays at the first chance
""")
_TAILS = _phrases(
    "in the end | in hard times | at harvest | on a long road | in a dry summer | at the fair | "
    "in the long run | sooner or later | every time | in a wet spring | on market day | "
    "when times are hard | all year round | as everyone knows | in every village | by the next moon"
)

# --- today_tomorrow: "The nets you mend today will feed you tomorrow." -----------------------------
_MANNER = ("",) * 3 + _phrases(
    "with care | by lamplight | in the rain | without complaint | gladly | before breakfast | "
    "in silence | slowly | patiently | properly | in daylight"
)
_SMALL = ("",) * 2 + _words("old small humble worn little last plain")
_PERSONS = (("you", "you", "your"), ("we", "us", "our"))  # subject, object, possessive
_NEGLECT = _words("neglect forget ignore overlook")
_TOMORROW_GOOD = _tagged("""
    hard work: will feed {o} | will pay {o} back | will be {p} bread
    foresight: will keep {o} warm | will spare {o} a sorrow | will save {o} a journey
    foresight: will carry {o} through
    pride: will make {o} proud
    trust: will stand by {o}
    luck: will be {p} luck
    family: will keep {p} children fed
""")
_TOMORROW_BAD = _tagged("""
    foresight: will cost {o} dearly | will fail {o} | will leave {o} hungry | will be {p} sorrow
    hard work: will ruin {p} harvest | will cost {o} twice as much
    pride: will shame {o}
    neighbors: will set tongues wagging
    home: will haunt {p} house
""")
_TOMORROW_AND = _tagged("""
    foresight: you will thank yourself | the winter will pass you by | you will sleep without worry
    neighbors: neighbors will seek your help
    kindness: you will have bread to share
    the weather: no storm can shame you
    luck: luck will find you working
    hard work: the work will sing for you | you will sit while others run
    family: your children will eat well
    money: the market will pay you well
""")

# --- prompts ----------------------------------------------------------------------------------------
# Fields: {w} the noun, {pl} its plural, {a} with its article, {c} a theme, {p} a persona,
# {t} a topic ("goats" or "the goat"), {s} the saying's shape.
_WORD_PROMPTS = _phrases(
    "Tell me something about {pl}. | Give me a saying about {pl}. | Write a proverb that mentions {a}. | "
    'I need a saying with the word "{w}" in it. | What do people say about {pl}? | '
    "A proverb about {pl}, please. | Do you know any old wisdom about {pl}? | "
    "Make up a folk saying that uses the word {w}."
)
_CATEGORY_PROMPTS = _phrases(
    "Share a proverb about {c}. | What's a good saying about {c}? | Give me some folk wisdom on {c}. | "
    "I'd like a proverb on the subject of {c}. | Teach me an old saying about {c}. | "
    "Is there a proverb about {c}? | Say something wise about {c}."
)
_PERSONA_PROMPTS = _phrases(
    "What would {p} say about {t}? | Pretend you are {p}. What do you say about {t}? | "
    "Give me a saying {p} might use about {t}. | How would {p} sum up {t} in one proverb? | "
    "Speak as {p} and give me a proverb about {t}. | If you were {p}, what would you tell me about {t}?"
)
_TEMPLATE_PROMPTS = _phrases(
    "Give me a proverb of the form '{s}' about {pl}. | Write a saying shaped like '{s}' about {pl}. | "
    "Using the pattern '{s}', make up a proverb about {pl}. | I want a '{s}' proverb about {pl}. | "
    "Fill in the pattern '{s}' with a saying about {pl}. | "
    "Can you give me a saying in the '{s}' style that mentions {a}?"
)
_OPEN_PROMPTS = _phrases(
    "Tell me a folk saying. | Share an old proverb. | Do you know a good proverb? | "
    "Give me a piece of folk wisdom. | Say something wise. | "
    "What's a saying your grandmother might have used? | Tell me a proverb I haven't heard before. | "
    "Give me a saying to think about today. | Share a bit of country wisdom. | Make up a proverb."
)
# Who would plausibly talk about a thing of each noun class; half the persona prompts use these and
# half the general ones, so the pairing is suggestive but not a giveaway.
_PERSONAS = _kinded_words(
    """
    animal: an old shepherd | a goatherd from the hills | a farmer's wife | a horse trader | a stable hand
    animal: a cattle drover | a beekeeper
    blade: a retired blacksmith | an old carpenter | a woodcutter | a hedge cutter
    gear: an old fisherman | a ship's carpenter | a traveling tinker | a basket weaver | a ferryman | a carter
    crop: a wise old farmer | an orchard keeper | a market gardener | a miller's wife | a vineyard worker
    house: a village builder | a thatcher | a stonemason | an innkeeper | a grandmother by the fire
    money: a market trader | a village moneylender | a thrifty grandmother | a shopkeeper | a peddler
    general: a village elder | a grandmother | an old sailor | a wandering monk | a country priest
    general: a riverboat captain | a night watchman | a mountain schoolteacher | an old soldier | a midwife
    """,
    (*NOUNS, "general"),
)
