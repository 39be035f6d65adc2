"""Everyday requests about nothing in particular: the "no expert fits" reference of the semantic
router's gate (``routers/semantic.py``).

A gate calibrated only on each expert's own held-out prompts knows how close in-distribution
queries come, not how far a query may drift before no expert fits; these prompts are the other
side. They are general chat topics (cooking, travel, health, history, sport, …), written here
rather than drawn from a dataset, so every machine has the same bytes and nothing is downloaded.
"""

from __future__ import annotations

OFF_TOPIC_PROMPTS: tuple[str, ...] = (
    # cooking and food
    "How do I bake a loaf of sourdough bread at home?",
    "What can I cook for dinner with rice, eggs and spinach?",
    "Give me a recipe for a vegetarian lasagna.",
    "How long should I boil an egg for a runny yolk?",
    "What wine goes well with grilled salmon?",
    "Is it safe to refreeze chicken that has thawed?",
    "Suggest a quick breakfast that is high in protein.",
    "Why does my cake sink in the middle after baking?",
    # travel and places
    "What are the best things to do in Lisbon for three days?",
    "Do I need a visa to travel from Canada to Japan?",
    "Which is the cheapest way to get from the airport to the city centre?",
    "Recommend a quiet beach destination in Europe for September.",
    "What should I pack for a week of hiking in the mountains?",
    "How early should I arrive at the airport for an international flight?",
    "Tell me about the history of the Eiffel Tower.",
    "What is the weather usually like in Iceland in winter?",
    # health and fitness
    "How many hours of sleep does an adult need?",
    "What are good stretches for lower back pain?",
    "How can I start running if I have never exercised?",
    "What are the symptoms of dehydration?",
    "Is it better to work out in the morning or in the evening?",
    "How much water should I drink every day?",
    "What foods are rich in iron?",
    "How do I lower my stress before an exam?",
    # history and society
    "Why did the Roman Empire fall?",
    "Who was Cleopatra and why is she famous?",
    "Explain the causes of the First World War.",
    "What was the significance of the printing press?",
    "Summarise the main ideas of the French Revolution.",
    "How did the Silk Road shape trade between Asia and Europe?",
    "What is the role of a parliament in a democracy?",
    "Who painted the ceiling of the Sistine Chapel?",
    # science and nature
    "Explain how photosynthesis works in simple terms.",
    "Why is the sky blue?",
    "What causes earthquakes?",
    "How do vaccines train the immune system?",
    "What is a black hole?",
    "Why do leaves change colour in autumn?",
    "How far is the Moon from the Earth?",
    "What is the difference between a virus and a bacterium?",
    "How do bees make honey?",
    "Explain the theory of evolution by natural selection.",
    # arts, books and music
    "Recommend a classic novel for a long train journey.",
    "Write a short poem about the sea at night.",
    "What makes a good opening line for a story?",
    "Who composed the Four Seasons?",
    "Suggest some jazz albums for a beginner.",
    "What is the plot of Pride and Prejudice?",
    "How do I learn to play the guitar as an adult?",
    "Describe the style of impressionist painting.",
    # work, money and everyday life
    "How do I write a polite email asking for a deadline extension?",
    "What should I say in a job interview when asked about my weaknesses?",
    "How can I save money on my electricity bill?",
    "What is the difference between a savings account and a current account?",
    "Give me tips for a productive morning routine.",
    "How do I negotiate a higher salary?",
    "What is a good way to organise a small kitchen?",
    "How do I get a red wine stain out of a carpet?",
    "What should I consider when adopting a dog?",
    "How often should I water a cactus?",
    # sport and games
    "What are the rules of cricket, briefly?",
    "Who has won the most football World Cups?",
    "How do I improve my chess openings?",
    "What is a good warm-up before playing tennis?",
    "Explain the offside rule in football.",
    "Which muscles does swimming work?",
    # conversation and opinions
    "Hello, how are you today?",
    "Tell me a joke about cats.",
    "What is the meaning of life?",
    "Can you recommend a film for a rainy evening?",
    "What do you think about working from home?",
    "Help me plan a birthday party for my daughter.",
    "What is a thoughtful gift for a retiring colleague?",
    "How do I make new friends after moving to a new city?",
    "Translate 'good morning, how are you' into Spanish.",
    "What are some fun things to do on a weekend without spending money?",
)
