"""Hand-written word lists for the procedural movie-review corpus (written for prefalign).

Lists are whitespace- or "|"-separated strings so they stay compact; ``words()`` splits them.
Opinion words are graded in four tiers (strong/mild x positive/negative) because the corpus
must spread the gold reward (VADER) over [0, 1], not only hit its two ends.
"""
from __future__ import annotations


def words(s: str) -> list[str]:
    """Split a list written as "a b c" or, for multi-word items, "a b | c d"."""
    sep = "|" if "|" in s else None
    return [w.strip() for w in s.split(sep) if w.strip()]


FIRST_NAMES = words("""
Ada Alma Anton Arlo Astrid Beatrix Bruno Calla Casper Celeste Dario Delphine Desmond Dora Edgar Elena Elias
Esme Felix Fiona Flora Gideon Greta Hamish Hazel Hector Ida Ines Ivan Jasper Juno Kasimir Keira Lena Leopold
Lior Lucia Magnus Mara Marcel Mila Nadia Nico Noor Oona Orson Otto Paloma Pavel Petra Quentin Rafael Rhea
Rosa Rufus Sabine Saoirse Silas Sofia Stellan Talia Tobias Ulla Valentina Vera Viktor Wanda Walter Xavier
Yara Yusuf Zelda Zoltan Agnes Bernard Clara Dmitri Eamon Freya Gustav Helena Ingrid Jonas Klara Lorenzo
Marisol Niamh Oskar Priya Ravi Selma Theo Ursula Vivian Wesley Abel Beatriz Cyrus Dagny Emeric Fenna Gunnar
Hilde Idris Jolene Kwame Ludmila Mateo Nell Octavia Percival Rosalind Sven Tamsin Umar Valeria Wilhelmina Yvette
Ambrose Bettina Cosimo Dorothea Evander Florian Giselle Horace Imogen Jerome Kalinda Lazlo Marguerite Nikolai
Ottilie Philippa Raimund Seraphina Thaddeus Winifred Anselm Brigid Cornelius Dashiell Eleanor Fabian Gwendolyn
""")

SURNAMES = words("""
Abernathy Achterberg Albescu Alvarado Ashdown Balogun Barrington Beaumont Bellweather Blackwood Brannigan
Castellano Chandrasekar Cormac Dalgaard Delacroix Drummond Eastwick Ellingsen Esposito Fairbanks Falkenrath
Ferreira Fitzgerald Galloway Garibaldi Grimaldi Halvorsen Hargreaves Hollister Ibsen Iwasaki Jablonski Kowalczyk
Krishnan Lambrecht Lindqvist Lockhart Macready Marchetti Montague Nakamura Navarro Oyelaran Pemberton Petrakis
Quiroga Rasmussen Ravensworth Rourke Santangelo Sandoval Schroeder Sinclair Soderberg Takahashi Thornbury
Underhill Valdivia Vasquez Wainwright Whitlock Winterbourne Xiang Yamamoto Zeller Zielinski Okonkwo Haddad
Moreau Lindgren Brennan Carvalho Duchamp Eriksen Fontaine Gallagher Hoffmann Ishikawa Jovanovic Kovacs Larkspur
Mendelsohn Novak Obradovic Pellegrini Quartermaine Rostova Steinberg Tremblay Umberto Vandermeer Westergaard
Achebe Bergstrom Cavendish Dunmore Eckhardt Fairweather Gostinski Holloway Ingersoll Jaramillo Kilbride Lachance
Mulvaney Nightingale Oduya Penhaligon Quinlan Rutherford Strickland Toussaint Urquhart Villeneuve Wetherby
Ashcombe Blackstone Cardenas Devereux Entwistle Fenwick Goldsworthy Hathaway Kettering Lindstrom Marlowe Northcott
""")

TITLE_ADJECTIVES = words("""
Silent Crimson Hollow Burning Frozen Distant Broken Golden Hidden Last Lonely Midnight Northern Quiet Restless
Scarlet Secret Shattered Southern Velvet Wandering Wild Electric Forgotten Iron Paper Painted Sleepless Sunken
Endless Bitter Borrowed Copper Drowned Faded Fallen Glass Invisible Lucky Marble Neon Pale Rusted Silver Stolen
Amber Blind Burnt Cold Crooked Dusty Eastern Empty Final Gilded Heavy Howling Humble Merciful Mourning Open
Private Rising Salt Savage Second Seventh Sleeping Tender Thin Twisted Unfinished Vanishing Western Woven
""")

TITLE_NOUNS = words("""
Harbor Orchard Lantern Horizon Echo Garden Highway Mirror River Signal Kingdom Tide Winter Summer Compass Cathedral
Frontier Labyrinth Carousel Orbit Meadow Avalanche Monsoon Lighthouse Circus Canyon Embassy Fortress Island Letter
Machine Requiem Serenade Sparrow Telegram Voyage Wilderness Archive Bridge Comet Desert Ember Falcon Glacier Hourglass
Jungle Manuscript Nocturne Observatory Pilgrim Quarry Reservoir Satellite Tundra Vineyard Waltz Zephyr Alibi Ballad
Anthem Bastion Caravan Chimera Citadel Covenant Dynasty Eclipse Fable Gallows Harvest Inferno Jubilee Keystone
Lullaby Mosaic Nomad Oracle Paradox Pendulum Prophecy Rhapsody Sanctuary Sonata Tempest Undertow Vendetta Widow
""")

GENRES = words("""
thriller | drama | comedy | romantic comedy | horror film | western | musical | documentary | war film |
science fiction film | fantasy epic | crime drama | courtroom drama | heist movie | coming-of-age story |
family film | animated feature | period piece | psychological thriller | mystery | satire | biopic | noir |
spy thriller | disaster movie | road movie | sports drama | political thriller | melodrama | slasher |
mockumentary | space opera | costume drama | buddy comedy | ghost story | survival drama | chamber piece |
martial arts film | dark comedy | character study
""")

PLACES = words("""
Lisbon | Reykjavik | Marseille | Naples | Havana | Istanbul | Kyoto | Montreal | Buenos Aires | Tangier |
Vienna | Prague | Glasgow | Cape Town | Mumbai | Seoul | Oslo | Dublin | Nairobi | Valparaiso | Tbilisi |
Helsinki | Krakow | Sarajevo | Lagos | Manila | Hanoi | Antwerp | Trieste | Bruges | Alaska | Patagonia |
Sicily | Andalusia | Cornwall | Tasmania | Mongolia | Siberia | Yukon | Provence | Bavaria | Galicia |
a small fishing village | a crowded megacity | a remote mining town | an abandoned space station | a sleepy suburb |
a desert outpost | a snowed-in hotel | a floating city | a border town | an island monastery | a cargo ship |
a research base in Antarctica | a rundown boarding school | a crumbling palace | a travelling circus |
Marrakesh | Zanzibar | Kathmandu | Samarkand | Ushuaia | Dakar | Belfast | Bucharest | Odessa | Palermo | Seville |
Granada | Porto | Ljubljana | Tallinn | Riga | Vilnius | Gdansk | Dresden | Leipzig | Lyon | Bordeaux | Geneva |
Salzburg | Innsbruck | Zagreb | Belgrade | Sofia | Thessaloniki | Smyrna | Beirut | Damascus | Cairo | Alexandria |
Khartoum | Addis Ababa | Mombasa | Lusaka | Windhoek | Luanda | Accra | Timbuktu | Bogota | Quito | Lima | Cusco |
La Paz | Montevideo | Asuncion | Caracas | Cartagena | Oaxaca | Veracruz | Winnipeg | Halifax | Anchorage |
Saskatchewan | Nebraska | Louisiana | Appalachia | Okinawa | Hokkaido | Borneo | Sumatra | Goa | Kerala | Punjab |
a lighthouse on the coast | a mountain village | a jazz club | a hospital ward | a night train
""")

ROLES = words("""
detective widow smuggler astronaut schoolteacher boxer surgeon violinist journalist soldier priest chef
lighthouse keeper | archaeologist | bank robber | taxi driver | ballerina | fisherman | senator | spy |
nurse | con artist | farmer | librarian | pilot | stuntman | magician | painter | sheriff | hacker | judge |
mechanic | novelist | photographer | runaway | botanist | diplomat | gambler | hitman | inventor | jazz singer |
locksmith | midwife | orphan | poet | professor | ranger | sailor | scientist | shepherd | tailor | translator |
blacksmith | bricklayer | caretaker | chaplain | cobbler | courier | dockworker | falconer | ferryman | glassblower |
gravedigger | harpist | innkeeper | jeweller | lumberjack | miner | notary | organist | pharmacist | puppeteer |
quartermaster | saddler | seamstress | stonemason | surveyor | telegraphist | trapeze artist | usher | weaver |
undertaker | veteran | waitress | zookeeper | bodyguard | chess prodigy | con man | forger | geologist |
heiress | cartographer | clockmaker | beekeeper | radio host | street musician | tour guide | night watchman
""")

OBJECTS = words("""
a stolen diamond | a missing manuscript | an old map | a cursed painting | a locked suitcase | a coded letter |
a lost dog | a family secret | a forbidden love | a buried treasure | a vanished sister | a mysterious stranger |
a haunted house | a failing restaurant | a rigged election | a broken promise | an unpaid debt | a faded photograph |
a hidden tunnel | a dying star | a runaway train | a rare violin | a forged passport | a sunken ship |
a time machine | a talking parrot | a secret society | a corrupt mayor | an ancient curse | a sleeping volcano |
a missing heir | a poisoned well | a stolen car | a lottery ticket | a wedding gone wrong | a mountain pass |
a chess tournament | a boxing match | a music contest | a cooking competition | a prison break | a family farm |
an alien signal | a rogue robot | a cold case | a deadly virus | a double agent | an inheritance |
a stolen harpsichord | a counterfeit banknote | a jade figurine | a sealed envelope | a burnt diary | a silver locket |
a cracked hourglass | a missing pilot | an unsigned confession | a rare orchid | a frozen mammoth | a pearl necklace |
a flooded mine | a forgotten tune | a shipment of rifles | a runaway bride | a lost expedition | a wax cylinder |
a crooked landlord | a smuggled manuscript | a ghost ship | a meteorite | an experimental vaccine | a hidden will
""")

VERBS_PLOT = words("""
discover chase follow uncover investigate protect betray rescue escape pursue confront abandon inherit
hunt steal hide search guard question defend smuggle track decode recover expose forgive remember trust
doubt survive visit flee outwit deceive befriend marry bury sell rebuild restore challenge
negotiate photograph interrogate blackmail shelter sabotage excavate impersonate infiltrate kidnap
map measure mourn nurse paint ransom recruit repair rob rehearse seduce shadow sketch summon tame
translate unmask unearth wager worship avenge bribe chart confess deliver
""")

VERBS_JOURNEY = words("""
travels to | returns to | moves to | wanders through | arrives in | flees to | drifts through | settles in |
gets stranded in | grows up in | hides out in | sets off for
""")

ASPECTS = words("""
acting | script | screenplay | plot | story | dialogue | pacing | editing | cinematography | camera work |
lighting | score | soundtrack | music | sound design | production design | costume design | set design |
effects work | creature design | makeup | ending | opening scene | final act | first half | second half |
climax | twist | premise | direction | casting | ensemble cast | lead performance | supporting cast |
chemistry between the leads | villain | humour | stunt work | fight choreography | dancing |
car chase | romance | character development | world building | tone | atmosphere | color palette | runtime |
voice acting | animation | narration | flashback structure | musical score | framing | production | theme song |
subtitle translation | aspect ratio | title sequence | prologue | epilogue | montage | sword fighting | wardrobe |
sound mix | night photography | location scouting | child acting | dialogue editing | comic timing | final shot
""")

# Opinion adjectives in four tiers. Most are in VADER's lexicon so the gold reward can see them.
ADJ_POS_STRONG = words("""
brilliant superb outstanding magnificent excellent wonderful fantastic amazing extraordinary marvelous
stunning breathtaking masterful flawless perfect spectacular phenomenal sublime glorious exceptional
exquisite dazzling remarkable astonishing terrific incredible awesome beautiful gorgeous triumphant
""")

ADJ_POS_MILD = words("""
good nice pleasant decent solid fine enjoyable charming likable agreeable sweet warm fun funny clever witty
engaging lovely interesting entertaining appealing capable competent tender gentle satisfying cheerful
heartfelt sincere honest fresh lively graceful elegant
""")

ADJ_NEG_MILD = words("""
weak dull bland uneven flat clumsy tired slow messy awkward silly shallow tedious predictable lazy mediocre
disappointing forgettable confusing boring stale thin sloppy heavy-handed overlong cheap muddled lifeless
lukewarm bleak annoying
""")

ADJ_NEG_STRONG = words("""
awful terrible horrible dreadful atrocious abysmal pathetic painful disastrous unbearable hideous ugly
stupid ridiculous worthless appalling miserable horrendous pointless insulting idiotic disgusting
embarrassing unwatchable inept hateful nasty offensive excruciating nauseating
""")

# Descriptive adjectives with no opinion in them; neutral reviews and plot summaries use these.
ADJ_NEUTRAL = words("""
long short quiet loud dark grainy slow-burning fast-paced black-and-white colourful old-fashioned modern
wordy sparse dense talky low-budget big-budget independent foreign-language silent animated episodic
nonlinear minimalist sprawling unusual conventional traditional experimental literary theatrical
documentary-style handheld widescreen rural urban nocturnal wintry tropical coastal industrial
hand-painted stop-motion improvised three-hour ninety-minute claustrophobic dialogue-free operatic
sun-bleached rain-soaked candle-lit studio-bound feverish meditative deadpan anthology courtroom-bound
""")

NOUN_POS = words("""
masterpiece | gem | triumph | delight | treasure | joy | winner | classic | marvel | revelation | treat |
knockout | crowd-pleaser | tour de force | work of art | breath of fresh air | labor of love | pleasure
""")

NOUN_NEG = words("""
mess | disaster | failure | bore | letdown | disappointment | catastrophe | waste of time | train wreck |
snooze | dud | flop | misfire | chore | slog | embarrassment | trainwreck | waste of talent
""")

# Verbs a critic uses on a performance, in the third person singular.
VERB_POS = words("""
shines | dazzles | excels | impresses | delights | sparkles | charms | soars | captivates | astonishes |
carries the film | steals every scene | nails the role | gives a career-best performance
""")

VERB_NEG = words("""
stumbles | struggles | flounders | disappoints | bores | grates | fails | overacts | sleepwalks through the part |
phones it in | drags the film down | ruins every scene | looks lost | seems miscast
""")

# Degree adverbs: VADER boosts intensifiers and damps hedges, which grades the gold reward.
ADV_STRONG = words("""
extremely | incredibly | absolutely | totally | utterly | remarkably | exceptionally | thoroughly |
completely | truly | really | so | deeply | hugely | enormously | tremendously | unbelievably | entirely
""")

ADV_HEDGE = words("""
somewhat | slightly | a little | kind of | sort of | fairly | rather | mostly | occasionally | partly |
mildly | marginally | reasonably | moderately | a bit | more or less
""")

AUDIENCES = words("""
anyone | my friends | families | teenagers | fans of the genre | film students | my parents | animation lovers |
history buffs | horror fans | romantics | casual viewers | serious cinephiles | kids | my worst enemy |
people who love a good mystery | anyone with a pulse | fans of the original | science fiction fans
""")

VENUES = words("""
at the cinema | at a film festival | on a long flight | on streaming | at a drive-in | on television |
at a midnight screening | at a retrospective | on a rainy afternoon | on a laptop in bed | at an outdoor screening |
at the local multiplex | at an art house theatre | at a sold-out premiere
""")

COMPANIONS = words("""
my sister | my brother | my grandmother | my roommate | a few friends | my partner | my kids | my father |
my mother | my neighbour | a colleague | my film club | my cousin | my best friend | nobody
""")

WHEN = words("""
last night | last weekend | on Sunday | on Friday night | yesterday | a few days ago | over the holidays |
this morning | last month | during a heatwave | on my birthday | after work
""")

CONNECTIVES = words("""
Honestly | Frankly | To be fair | In my opinion | Overall | In the end | Still | Then again | Admittedly |
Without a doubt | For what it is worth | To my surprise | As expected | In short | All in all |
Of course | Clearly | Personally | Strangely | Predictably | Ultimately | Above all | Basically | Simply put
""")

CONNECTIVES_POS = words("Thankfully | Happily | Luckily | Fortunately | Best of all | Even better")
CONNECTIVES_NEG = words("Sadly | Unfortunately | Worse still | Alas | Regrettably | On top of that")

FEELINGS_POS = words("""
moved | thrilled | delighted | charmed | impressed | happy | elated | uplifted | inspired | grateful | amused |
captivated | enchanted | overjoyed
""")

FEELINGS_NEG = words("""
bored | annoyed | frustrated | angry | disappointed | sad | irritated | confused | tired | insulted |
disgusted | depressed | furious | miserable
""")

# Character traits for people in plot summaries ("a grieving detective").
TRAITS = words("""
grieving stubborn reckless shy ambitious retired disgraced widowed restless lonely idealistic cynical
aging young gifted troubled penniless eccentric reclusive fearless nervous charismatic ruthless naive
homesick bookish quiet-spoken hot-headed soft-hearted world-weary sharp-tongued absent-minded good-natured
stoic jittery pious superstitious unemployed overworked estranged exiled forgetful proud secretive
freckled bearded one-eyed pregnant bankrupt clairvoyant insomniac left-handed tone-deaf soft-spoken
meticulous gullible sleepless chain-smoking barefoot moustached near-sighted tireless widowered mute
""")

THEMES = words("""
grief loyalty ambition memory revenge faith class identity guilt exile friendship family greed
redemption betrayal obsession jealousy solitude forgiveness survival power freedom sacrifice regret
fatherhood motherhood childhood aging migration colonialism corruption masculinity addiction
heritage ritual vanity temptation modesty curiosity tradition progress ambiguity mortality humility
resentment devotion rivalry kinship displacement surveillance labour wealth poverty hunger
ambition-versus-duty belonging courage destiny honour innocence justice madness nostalgia pride
""")

ERAS = words("""
in the nineteen-twenties | during the Cold War | after the flood | on the eve of the revolution |
during a long drought | in the last days of the empire | in the near future | during the gold rush |
in the summer of the blackout | after the war | during prohibition | in medieval times | in the late sixties |
during the plague years | at the turn of the century | during a general strike | in a post-apocalyptic future
""")

COLOURS = words("""
amber cobalt crimson emerald ochre teal violet sepia indigo scarlet turquoise mustard charcoal ivory
magenta saffron silvery olive lavender copper-tinted rust-coloured bottle-green sea-blue
mauve vermilion cerulean chartreuse burgundy tangerine pistachio slate-grey honey-coloured
""")

INSTRUMENTS = words("""
cello | accordion | harpsichord | banjo | synthesizers | a lone trumpet | a string quartet | church organ |
bagpipes | a marimba | a theremin | a full orchestra | a children's choir | slide guitar | tabla | a harmonica |
a grand piano | a mandolin | electric bass | kettle drums
""")

ANIMALS = words("""
a stray cat | a three-legged dog | a parrot | a horse | a tortoise | a goat | a swarm of bees | a wolf |
a flock of crows | a fox | an owl | a donkey | a whale | a peacock | a goldfish | a bear | a camel
""")

SNACKS = words("""
popcorn | nachos | a bag of peppermints | cold pizza | liquorice | a thermos of tea | chocolate raisins |
a hot dog | salted pretzels | too much soda | ice cream | sunflower seeds
""")

# Crafts a critic praises or blames with an adverb: "beautifully photographed".
CRAFTS = words("""
shot acted written edited paced lit scored staged cast directed photographed choreographed designed
structured plotted framed dubbed costumed narrated animated
""")

# Manner adverbs with an opinion in them, graded by hand: "beautifully shot", "clumsily written".
MANNER_POS = words("""
beautifully brilliantly superbly wonderfully gorgeously expertly lovingly elegantly gracefully cleverly
sensitively skilfully confidently tenderly vividly delicately masterfully wittily charmingly movingly
""")

MANNER_NEG = words("""
badly clumsily lazily poorly sloppily awkwardly terribly horribly dreadfully carelessly cheaply
amateurishly woodenly shoddily ineptly blandly tediously crudely lifelessly stupidly
""")

WEATHER = words("""
pouring with rain | snowing | unbearably hot | foggy | windy | freezing | humid | stormy | sleeting |
drizzling | blazing sunshine | grey and misty
""")

# Turning points of plot summaries: "... until the river floods."
EVENTS = words("""
the factory closes | a stranger arrives | the river floods | war breaks out | the letters stop coming |
a body is found | the circus leaves town | the harvest fails | an earthquake strikes | the mayor disappears |
the lights go out | a comet appears | the border closes | the bank collapses | an election is called |
a telegram arrives | the mine caves in | the orchestra goes on strike | a child goes missing | the tide turns |
the ferry sinks | a wildfire spreads | the landlord sells the building | an old friend shows up
""")

RELATIVES = words("""
estranged daughter | stepfather | twin brother | godmother | grandson | fiancee | ex-husband | landlady |
mentor | apprentice | half-sister | nephew | niece | widower | stepdaughter | great-aunt | bridegroom | cousin
""")
