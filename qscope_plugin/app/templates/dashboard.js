// Filter the feature list (and the cards) as the search box changes: a number matches that feature id,
// anything else every word must appear in the entry's explanation or top tokens.
(function () {
  "use strict";
  var box = document.getElementById("feature-search");
  var entries = Array.prototype.slice.call(document.querySelectorAll("#feature-list [data-feature]"));
  var shown = document.getElementById("feature-shown");

  function matches(entry, query) {
    if (/^\d+$/.test(query)) {
      return entry.getAttribute("data-feature") === query;
    }
    var haystack = entry.getAttribute("data-search");
    return query.split(/\s+/).every(function (word) { return haystack.indexOf(word) !== -1; });
  }

  function filter() {
    var query = box.value.trim().toLowerCase();
    var n = 0;
    entries.forEach(function (entry) {
      var hit = query === "" || matches(entry, query);
      entry.hidden = !hit;
      var card = document.getElementById("card-" + entry.getAttribute("data-feature"));
      if (card) { card.hidden = !hit; }
      if (hit) { n += 1; }
    });
    shown.textContent = n + " of " + entries.length;
  }

  box.addEventListener("input", filter);
  filter();
})();
