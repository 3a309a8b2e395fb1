"""The recipe stage: the schema of a recipe, reading it (YAML and overrides), the cross-field rules, the execution
it asks for, and resolving it for one launch into a ResolvedRun; plus the architecture it names, the generated
reference and the shipped recipes."""
