"use strict";
// The page's one script: fetches the API and shows it; agent output is set as text only.
