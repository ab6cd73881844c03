// PEFT's module matching rules (tuners_utils.check_target_module_exists), in C++.
#include <torchlora/apply/target_match.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <regex>

namespace torchlora::apply {

bool selector_matches(const io::ModuleSelector& selector, const std::string& module_name) {
  switch (selector.kind) {
    case io::ModuleSelector::Kind::None:
      return false;
    case io::ModuleSelector::Kind::Regex:
      try {
        return std::regex_match(module_name, std::regex(selector.regex, std::regex::ECMAScript));
      } catch (const std::regex_error& e) {
        TORCH_CHECK(false, "torchlora: invalid regular expression '", selector.regex, "': ", e.what());
      }
    case io::ModuleSelector::Kind::Names:
      return std::any_of(selector.names.begin(), selector.names.end(), [&](const std::string& entry) {
        return module_name == entry ||
               (module_name.size() > entry.size() && module_name.ends_with(entry) &&
                module_name[module_name.size() - entry.size() - 1] == '.');
      });
  }
  return false;
}

std::optional<int64_t> layer_index(const std::string& module_name, const std::vector<std::string>& layers_pattern) {
  // PEFT: re.match(r".*?\.[^.]*\.(\d+)\.", key), or per pattern re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", key).
  // Lazy prefixes, so the *first* numbered segment is the layer (not e.g. an expert index).
  std::vector<std::string> regexes;
  if (layers_pattern.empty()) {
    regexes.emplace_back(".*?\\.[^.]*\\.(\\d+)\\.");
  } else {
    for (const auto& pattern : layers_pattern) {
      regexes.push_back("(?:^|.*?\\.)" + pattern + "\\.(\\d+)\\.");
    }
  }
  for (const auto& text : regexes) {
    std::smatch m;
    std::regex re;
    try {
      re = std::regex(text, std::regex::ECMAScript);
    } catch (const std::regex_error& e) {
      TORCH_CHECK(false, "torchlora: invalid layers_pattern regular expression '", text, "': ", e.what());
    }
    if (std::regex_search(module_name, m, re, std::regex_constants::match_continuous)) {
      return std::stoll(m[1].str());
    }
  }
  return std::nullopt;
}

TargetMatch match_target_module(const io::LoraConfig& config, const std::string& module_name) {
  if (selector_matches(config.exclude_modules, module_name)) {
    return TargetMatch::Excluded;
  }
  // Adapters never go inside modules_to_save: re.match(rf"(^|.*\.){m}($|\..*)", key).
  for (const auto& m : config.modules_to_save) {
    if (std::regex_match(module_name, std::regex("(^|.*\\.)" + m + "($|\\..*)", std::regex::ECMAScript))) {
      return TargetMatch::Excluded;
    }
  }
  if (!selector_matches(config.target_modules, module_name)) {
    return TargetMatch::NotTarget;
  }
  // Layer filters apply to suffix matches of a name list (not to an exact entry or a regex).
  const bool exact = config.target_modules.kind == io::ModuleSelector::Kind::Names &&
                     std::find(config.target_modules.names.begin(), config.target_modules.names.end(),
                               module_name) != config.target_modules.names.end();
  if (config.layers_to_transform.has_value() && !config.layers_to_transform->empty() && !exact &&
      config.target_modules.kind == io::ModuleSelector::Kind::Names) {
    const auto index = layer_index(module_name, config.layers_pattern);
    if (!index.has_value()) {
      return TargetMatch::NotTarget;
    }
    const auto& layers = *config.layers_to_transform;
    return std::find(layers.begin(), layers.end(), *index) != layers.end() ? TargetMatch::Target
                                                                           : TargetMatch::NotTarget;
  }
  return TargetMatch::Target;
}

bool is_target_module(const io::LoraConfig& config, const std::string& module_name) {
  return match_target_module(config, module_name) == TargetMatch::Target;
}

}  // namespace torchlora::apply
